"""The loop bridge (see :mod:`capmoe_compile.bridge`): a transformers experts forward whose
``for v in mask.nonzero()`` loop over the hit experts is rewritten, from its source, into a
loop over *every* expert index (:func:`bridged_forward`), where the loop body provably adds
nothing for an expert no token chose (:func:`_loop_ok`, :func:`_unhit_adds_nothing`); any
other forward is left as written, with the reason (:func:`why_not_bridged`)."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch

from . import bridge_unique

# Calls a bridged loop body may not make: they could raise or differ on an expert with no rows
# (reductions over the rows, host reads), or mutate something other than the accumulator.
_FORBIDDEN_CALLS = {"item", "tolist", "max", "min", "amax", "amin", "argmax", "argmin", "numel"}


_FAILED: dict[Any, str] = {}  # code object -> why it is not bridged (for explain/debugging)


def why_not_bridged(fn: Callable) -> str | None:
    """Why ``fn``'s expert loop is left as written, or None when it is bridged."""
    bridged_forward(fn)
    return _FAILED.get(getattr(fn, "__code__", None))


@functools.cache
def bridged_forward(fn: Callable) -> Callable:
    """``fn`` with its ``for v in mask.nonzero()`` loop over experts bridged, else ``fn``."""
    try:
        return _bridge(fn)
    except (_NotBridged, bridge_unique.NotBridged) as e:
        _FAILED[fn.__code__] = str(e)
    except (OSError, TypeError, SyntaxError) as e:  # no source, a builtin: as written
        _FAILED[getattr(fn, "__code__", fn)] = f"{type(e).__name__}: {e}"
    return fn


class _NotBridged(Exception):
    pass


def every_index(mask: torch.Tensor, squeezed: bool = False, *bounds: Any):
    """The bridged ``mask.nonzero()``: every index of a 1-D mask, as the 1-tuples a loop over
    ``nonzero()`` rows reads with ``v[0]`` (as ints when the loop read ``nonzero().squeeze(-1)``
    rows with ``v.item()``); any other mask as ``nonzero`` gives it.

    ``bounds`` (a loop with no sentinel skip): the tensors and module lists its body indexes
    with the loop variable before any effect. Indices past the shortest are not run: in the
    original loop such an index, if hit, raises at that indexing before adding anything, so on
    every input the original runs without error both add the same. When none of them has a
    length, the loop is left as written (``nonzero``)."""
    if mask.dim() != 1:
        hit = mask.nonzero()
        return hit.squeeze(-1) if squeezed else hit
    n = mask.shape[0]
    if bounds:
        lengths = [
            b.shape[0] if isinstance(b, torch.Tensor) else len(b)
            for b in bounds
            if (isinstance(b, torch.Tensor) and b.dim() >= 1)
            or isinstance(b, (torch.nn.ModuleList, list, tuple))
        ]
        if not lengths:
            hit = mask.nonzero()
            return hit.squeeze(-1) if squeezed else hit
        n = min(n, *lengths)
    return list(range(n)) if squeezed else [(i,) for i in range(n)]


def _hit_call(value: ast.expr) -> tuple[ast.Call, bool] | None:
    """``<mask>.nonzero()`` (rows, read with ``v[0]``) or ``<mask>.nonzero().squeeze(-1)``
    (0-d tensors, read with ``v.item()``): the ``nonzero`` call and whether it is squeezed."""
    squeezed = False
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "squeeze"
        and len(value.args) == 1
        and not value.keywords
        and ast.unparse(value.args[0]) in ("-1", "1")
    ):
        value, squeezed = value.func.value, True
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "nonzero"
        and not value.args
        and not value.keywords
    ):
        return value, squeezed
    return None


def _bridge(fn: Callable) -> Callable:
    code = fn.__code__
    if code.co_freevars:
        raise _NotBridged("the forward is a closure")
    src = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(src)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise _NotBridged("not a plain function")
    fdef.decorator_list = []
    # H = <mask>.nonzero() (at top level or inside a `with`), H read only as a loop's iterable
    hits: dict[str, tuple[ast.Assign, ast.Call, bool]] = {}
    for node in ast.walk(fdef):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and (found := _hit_call(node.value)) is not None
        ):
            hits[node.targets[0].id] = (node, *found)
    loops = [
        (i, s)
        for i, s in enumerate(fdef.body)
        if isinstance(s, ast.For) and isinstance(s.iter, ast.Name) and s.iter.id in hits
    ]
    if len(loops) != 1:
        if bridge_unique.rewrite(fdef, _self_first(fdef), _indexed_by, _check_calls):
            return _compiled(fn, tree)
        raise _NotBridged(
            "no single top-level loop over a nonzero() result or over the values of a selection"
        )
    pos, loop = loops[0]
    hit = loop.iter.id
    loads = [
        n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == hit and n is not loop.iter
    ]
    if any(isinstance(n.ctx, ast.Load) for n in loads) or len(loads) != 1:
        raise _NotBridged(f"{hit} is used other than as the loop's iterable")
    assign, call, squeezed = hits[hit]
    bounds = _loop_ok(loop, fdef.body[pos + 1 :], squeezed, _self_first(fdef))
    _unhit_adds_nothing(fdef, loop, call, assign)
    assign.value = ast.Call(
        func=ast.Name("_capmoe_every_index", ast.Load()),
        args=[call.func.value, ast.Constant(squeezed), *bounds],
        keywords=[],
    )
    if squeezed:  # the loop runs over ints: `v = v.item()` goes
        loop.body = loop.body[1:]
    return _compiled(fn, tree)


def _self_first(fdef: ast.FunctionDef) -> bool:
    """Whether the function's first argument is ``self``, never rebound."""
    args = fdef.args.posonlyargs + fdef.args.args
    return (
        bool(args)
        and args[0].arg == "self"
        and not any(
            isinstance(n, ast.Name) and n.id == "self" and not isinstance(n.ctx, ast.Load)
            for n in ast.walk(fdef)
        )
    )


def _compiled(fn: Callable, tree: ast.Module) -> Callable:
    """The rewritten source of ``fn`` as a function of ``fn``'s module."""
    code = fn.__code__
    ast.fix_missing_locations(tree)
    # keep the source's line numbers: stack traces and explain point at the model's file
    ast.increment_lineno(tree, code.co_firstlineno - 1)
    compiled = compile(tree, code.co_filename, "exec")
    new_code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    # The bridged function lives in the model's own module namespace (Dynamo guards on the
    # globals it reads through that module), which gains these prefixed names.
    glb = fn.__globals__
    glb["_capmoe_every_index"] = every_index
    glb["_capmoe_every_value"] = bridge_unique.every_value
    new = types.FunctionType(new_code, glb, fn.__name__, fn.__defaults__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def _first_statement_ok(first: ast.stmt | None, v: str, squeezed: bool) -> bool:
    """``v = v[0]`` (rows of ``nonzero()``) or ``v = v.item()`` / ``int(v)`` (squeezed)."""
    if not (
        isinstance(first, ast.Assign)
        and len(first.targets) == 1
        and isinstance(first.targets[0], ast.Name)
        and first.targets[0].id == v
    ):
        return False
    src = ast.unparse(first.value)
    return src in (f"{v}.item()", f"int({v})") if squeezed else src == f"{v}[0]"


def _is_sentinel_skip(s: ast.If, v: str) -> bool:
    """``if v == <constant or attribute>: continue``."""
    return (
        isinstance(s.test, ast.Compare)
        and isinstance(s.test.left, ast.Name)
        and s.test.left.id == v
        and len(s.test.ops) == 1
        and isinstance(s.test.ops[0], ast.Eq)
        and bool(s.body)
        and all(isinstance(b, ast.Continue) for b in s.body)
        and not s.orelse
    )


def _empty_skip(s: ast.If) -> str | None:
    """``if X.numel() == 0: continue`` (also ``X.shape[0] == 0``, ``not X.numel()``): X."""
    if s.orelse or not s.body or not all(isinstance(b, ast.Continue) for b in s.body):
        return None
    src = ast.unparse(s.test)
    for pat in (r"(\w+)\.numel\(\) == 0", r"(\w+)\.shape\[0\] == 0", r"not (\w+)\.numel\(\)"):
        m = re.fullmatch(pat, src)
        if m:
            return m.group(1)
    return None


def _check_calls(s: ast.stmt) -> None:
    for n in ast.walk(s):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            name = n.func.attr
            if name in _FORBIDDEN_CALLS or (
                name.endswith("_") and not name.endswith("__") and name != "index_add_"
            ):
                raise _NotBridged(f"the loop body calls .{name}() (line {s.lineno})")
        if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Yield, ast.Await)):
            raise _NotBridged(f"the loop body has a {type(n).__name__} (line {s.lineno})")


def _loop_ok(
    loop: ast.For, after: list[ast.stmt], squeezed: bool, self_first: bool
) -> list[ast.expr]:
    """Raise unless running ``loop``'s body for an expert with no rows changes nothing.

    Drops the loop's empty-selection skips (``if rows.numel() == 0: continue``: data-dependent
    branches) where every ``index_add_`` adds over those rows, so an empty selection adds
    nothing either way. Returns the bounds :func:`every_index` takes: ``[]`` with a sentinel
    skip, else the ``self.<attr>[v]`` the body reads before its first ``index_add_``."""
    if not isinstance(loop.target, ast.Name) or loop.orelse:
        raise _NotBridged("the loop has a non-name target or an else clause")
    v = loop.target.id
    body = loop.body
    if not _first_statement_ok(body[0] if body else None, v, squeezed):
        want = f"{v} = {v}.item()" if squeezed else f"{v} = {v}[0]"
        raise _NotBridged(f"the loop body does not start with {want}")
    assigned: set[str] = {v}
    accumulators: set[str] = set()
    sentinel = False
    empty: list[tuple[ast.If, str]] = []
    added_over: set[str] = set()
    bounds: list[ast.expr] | None = None  # set at the first effect
    for s in body[1:]:
        if isinstance(s, ast.If):
            if _is_sentinel_skip(s, v):
                sentinel = True
            elif (rows := _empty_skip(s)) is not None:
                empty.append((s, rows))
                continue  # its test reads a size only: dropped below
            else:
                raise _NotBridged(f"the loop body branches (line {s.lineno})")
        elif isinstance(s, ast.Assign):
            for t in s.targets:
                names = t.elts if isinstance(t, ast.Tuple) else [t]
                if not all(isinstance(n, ast.Name) for n in names):
                    raise _NotBridged(f"the loop body writes into a tensor (line {s.lineno})")
                assigned.update(n.id for n in names)
        elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            f = s.value.func
            if not (
                isinstance(f, ast.Attribute)
                and f.attr == "index_add_"
                and isinstance(f.value, ast.Name)
                and len(s.value.args) >= 2
                and isinstance(s.value.args[1], ast.Name)
            ):
                raise _NotBridged(f"the loop body calls {ast.unparse(f)} for its effect")
            accumulators.add(f.value.id)
            added_over.add(s.value.args[1].id)
            if bounds is None:
                bounds = _indexed_by(body[1 : body.index(s) + 1], v)
        else:
            raise _NotBridged(f"the loop body has a {type(s).__name__} (line {s.lineno})")
        _check_calls(s)
    if accumulators & assigned:
        raise _NotBridged("the loop rebinds its accumulator")
    later = {n.id for s in after for n in ast.walk(s) if isinstance(n, ast.Name)}
    leaked = sorted(later & assigned)
    if leaked:
        raise _NotBridged(f"names set in the loop are read after it: {', '.join(leaked)}")
    if any(rows not in added_over or added_over != {rows} for _, rows in empty):
        raise _NotBridged("the loop skips an empty selection it does not add over")
    loop.body = [s for s in body if all(s is not e for e, _ in empty)]
    if sentinel:
        return []
    if not bounds or not self_first:
        # every index of the mask runs the body: the one past the last expert (one_hot over
        # E + 1 classes) would index the expert weights out of bounds without this skip or a
        # weight indexed by the loop variable that bounds the loop
        raise _NotBridged(
            f"the loop body has no `if {v} == <sentinel>: continue` and indexes no "
            f"self.<weights>[{v}] before it adds"
        )
    return bounds


def _indexed_by(stmts: list[ast.stmt], v: str) -> list[ast.expr]:
    """The ``self.<attr>[v]`` that ``stmts`` evaluate unconditionally (no ``if`` expression,
    ``and``/``or`` or comprehension around them), each once."""
    out: dict[str, ast.expr] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.IfExp, ast.BoolOp, ast.comprehension, ast.Lambda)):
            return
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Name)
            and node.slice.id == v
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            out.setdefault(ast.unparse(node.value), node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for s in stmts:
        if not isinstance(s, ast.If):  # skips evaluate only their test
            visit(s)
    return [ast.Attribute(ast.Name("self", ast.Load()), a.attr, ast.Load()) for a in out.values()]


def _mask_of_hit(test: ast.expr) -> str | None:
    """M when ``test`` is ``torch.greater(M.sum(dim=<negative dims>), 0)`` or
    ``M.sum(dim=<negative dims>) > 0``: the leading index of M whose slice has a nonzero."""
    if isinstance(test, ast.Call) and ast.unparse(test.func) == "torch.greater":
        if len(test.args) != 2 or test.keywords:
            return None
        total, zero = test.args
    elif isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Gt):
        total, zero = test.left, test.comparators[0]
    else:
        return None
    if not (isinstance(zero, ast.Constant) and zero.value == 0):
        return None
    if not (
        isinstance(total, ast.Call)
        and isinstance(total.func, ast.Attribute)
        and total.func.attr == "sum"
        and isinstance(total.func.value, ast.Name)
    ):
        return None
    dims = [*total.args, *(k.value for k in total.keywords if k.arg == "dim")]
    if len(dims) != 1 or len(total.args) + len(total.keywords) != 1:
        return None
    # negative dims only: a 1-D result (every_index checks it) then leaves exactly dim 0
    if not re.fullmatch(r"\(?-\d+(, -\d+)*,?\)?", ast.unparse(dims[0])):
        return None
    return total.func.value.id


def _check_one_hot(fdef: ast.FunctionDef, mask: str, hit: ast.Assign) -> None:
    """Raise unless every binding of ``mask`` is a ``one_hot`` (or a permutation or transpose
    of it) and nothing writes it in place: its entries are then 0 or 1."""
    a = fdef.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
    stores = [
        n
        for n in ast.walk(fdef)
        if isinstance(n, ast.Name) and n.id == mask and not isinstance(n.ctx, ast.Load)
    ]
    simple = [
        t
        for n in ast.walk(fdef)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id == mask
    ]
    if any(p is not None and p.arg == mask for p in params) or not simple:
        raise _NotBridged(f"the mask {mask} is not computed in the forward")
    if len(stores) != len(simple):
        raise _NotBridged(f"the mask {mask} is bound other than by a plain assignment")
    # the hit experts and the loop read the same mask: bound before the hit experts, once
    # they are computed at the top level (or in a top-level `with`), never again
    top = [*fdef.body, *(b for w in fdef.body if isinstance(w, ast.With) for b in w.body)]
    if not any(hit is t for t in top) or any(n.lineno >= hit.lineno for n in stores):
        raise _NotBridged(f"the mask {mask} is rebound after the experts hit are computed")
    for node in ast.walk(fdef):
        # nothing may change the mask in place: M += .., M[..] = .., M.<op>_(..)
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == mask
        ) or (
            isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete))
            and any(
                isinstance(t, ast.Subscript) and ast.unparse(t.value) == mask
                for t in getattr(node, "targets", [getattr(node, "target", None)])
            )
        ):
            raise _NotBridged(f"the mask {mask} is written in place (line {node.lineno})")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == mask
            and node.func.attr.endswith("_")
            and not node.func.attr.endswith("__")
        ):
            raise _NotBridged(f"the mask {mask} is changed in place by .{node.func.attr}()")
        if not (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == mask for t in node.targets)
        ):
            continue
        value = node.value
        while (  # one_hot(...).permute(...): the reorders of a one_hot
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in ("permute", "transpose")
            and isinstance(value.func.value, ast.Call)
            and all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in value.args)
            and not value.keywords
        ):
            value = value.func.value
        f = value.func if isinstance(value, ast.Call) else None
        one_hot = isinstance(f, (ast.Name, ast.Attribute)) and (
            getattr(f, "id", None) == "one_hot" or getattr(f, "attr", None) == "one_hot"
        )
        reorder = (
            isinstance(f, ast.Attribute)
            and f.attr in ("permute", "transpose")
            and isinstance(f.value, ast.Name)
            and f.value.id == mask
            and all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in value.args)
            and not value.keywords
        )
        if not (one_hot or reorder):
            raise _NotBridged(f"the mask {mask} is not a one_hot: {ast.unparse(value)}")


def _unhit_adds_nothing(
    fdef: ast.FunctionDef, loop: ast.For, call: ast.Call, hit: ast.Assign
) -> None:
    """Raise unless an expert the original loop skips (not hit) adds nothing when run.

    The hit experts are ``greater(M.sum(...), 0).nonzero()`` of a mask ``M`` that is a
    ``one_hot`` (permuted or transposed: no negative entries): not hit means ``M[v]`` is all
    zeros. Every ``index_add_`` adds over rows ``torch.where(M[v])`` gives: none for it."""
    mask = _mask_of_hit(call.func.value)
    if mask is None:
        raise _NotBridged(
            f"the experts hit are not the nonzero rows of a mask: {ast.unparse(call.func.value)}"
        )
    _check_one_hot(fdef, mask, hit)
    v = loop.target.id
    rows_of = set()
    for s in loop.body:
        if (
            isinstance(s, ast.Assign)
            and len(s.targets) == 1
            and isinstance(s.targets[0], ast.Tuple)
            and ast.unparse(s.value) == f"torch.where({mask}[{v}])"
        ):
            rows_of.update(n.id for n in s.targets[0].elts if isinstance(n, ast.Name))
    rebound = [
        n.id
        for s in loop.body
        for t in getattr(s, "targets", ())
        for n in ast.walk(t)
        if isinstance(n, ast.Name) and n.id in rows_of
    ]
    if len(rebound) != len(set(rebound)):
        raise _NotBridged(f"the loop rebinds the rows of torch.where({mask}[{v}])")
    for s in loop.body:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            rows = s.value.args[1]
            if not (isinstance(rows, ast.Name) and rows.id in rows_of):
                raise _NotBridged(
                    f"the loop adds over rows other than torch.where({mask}[{v}]) (line {s.lineno})"
                )
