"""FX helpers the passes share: node values and shapes, reachability, in-place updates and
aliasing. Written once; ``moe_layers``' modules, the routers and ``tokenwise`` import them
(and the backend and the bridge :func:`meta_value`)."""

from __future__ import annotations

import operator

import torch
from torch import fx

INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv}


def val(node):
    """The value Dynamo recorded for ``node`` (``example_value``), or None."""
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def meta_value(node):
    """``node``'s recorded value: Dynamo's ``example_value``, else the ``val`` of graphs that
    FakeTensor propagation filled (AOT, ``make_fx``); None where neither is recorded."""
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node):
    """``node``'s tensor shape, or None where its value is not a tensor."""
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def descendants(
    start: list[fx.Node], stop: fx.Node | None = None, *, inclusive: bool = True
) -> set[fx.Node]:
    """Every node reachable from ``start`` through users, not past ``stop`` (which is left
    out). ``inclusive=False``: the ``start`` nodes themselves only where reached from
    another."""
    seen: set[fx.Node] = set()
    todo = list(start) if inclusive else [u for n in start for u in n.users]
    while todo:
        n = todo.pop()
        if n in seen or n is stop:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def ancestors(start: list[fx.Node], *, inclusive: bool = True) -> set[fx.Node]:
    """Every node ``start`` is computed from. ``inclusive=False``: the ``start`` nodes
    themselves only where one is an input of another."""
    seen: set[fx.Node] = set()
    todo = list(start) if inclusive else [a for n in start for a in n.all_input_nodes]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def mutates(node: fx.Node) -> bool:
    """An in-place update (``setitem``, ``x += y``, a ``foo_`` method)."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in INPLACE_FUNCS:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def aliases_of(node: fx.Node) -> set[fx.Node]:
    """``node``, the tensors it is a view of, and every view of those (transitively): the
    nodes that share its storage by way of view ops."""
    base = node
    while is_alias(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    seen, todo = {base}, [base]
    while todo:
        for u in todo.pop().users:
            if u not in seen and is_alias(u) and u.args and u.args[0] in seen:
                seen.add(u)
                todo.append(u)
    return seen


_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full}
_FACTORY_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full"}


def is_fresh(node: fx.Node) -> bool:
    """A tensor a factory creates (not a view of anything)."""
    if node.op == "call_function":
        return node.target in _FACTORIES
    return node.op == "call_method" and node.target in _FACTORY_METHODS


def is_size(v) -> bool:
    """A size (int, SymInt, torch.Size, or a tuple of them), not data: the tuple a ``chunk``
    or ``split`` returns holds tensors and is data."""
    if isinstance(v, (int, torch.SymInt)):
        return True
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(is_size(e) for e in v)


def hint(size) -> int:
    """The value a (possibly symbolic) size has in the call being compiled."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return optimization_hint(size)


_ALIASING = {"view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze"}
_ALIASING |= {"view_as", "narrow", "select", "as_strided", "flatten", "unflatten", "chunk"}
_ALIASING |= {"split", "unbind", "diagonal", "movedim", "detach", "contiguous", "__getitem__"}


def is_alias(node: fx.Node) -> bool:
    """Whether ``node`` may return a view of its first argument."""
    if node.op == "call_method":
        return node.target in _ALIASING
    if node.op == "call_function":
        if node.target is operator.getitem and advanced_index(node):
            return False  # indexing with a tensor copies (``y[rows]`` before ``y[rows] += v``)
        name = getattr(node.target, "__name__", "")
        return name in _ALIASING or node.target is operator.getitem
    return False


def advanced_index(node: fx.Node) -> bool:
    """``t[idx]`` where an index is a tensor: PyTorch's advanced indexing, which returns a copy
    whatever the other indices are."""
    if len(node.args) != 2 or not isinstance(val(node.args[0]), torch.Tensor):
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return any(isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor) for i in idx)
