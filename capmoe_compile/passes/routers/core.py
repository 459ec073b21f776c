"""What every router spelling shares: the site and match records, the two registries, and the
FX helpers the spellings read graphs with.

Two registries, both ordered by an explicit priority (larger first; ties in registration
order):

- **site spellings** (:func:`register_site`): ``spelling(node) -> TopKSite or None``, how a
  model spells "the k best experts of each row" (``topk``, ``max(dim)``, ``argmax``, a sort
  and a slice, a declared router). :func:`register_site_rewrite` adds a step that runs on all
  sites of a graph at once (two top-1 picks that are one top-2; a group-limited stage that is
  part of a later top-k).
- **router patterns** (:func:`register_router`): ``pattern(site) -> RouterMatch or None``, how
  ``P`` is read from the graph for a site (SPEC.md, "Notation": each pattern's ``p_rule``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from ..fx_util import shape as shape_of
from ..fx_util import val

SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, "softmax"}
SIGMOID = {torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, "sigmoid"}
LINEAR = {F.linear, torch._C._nn.linear, torch.matmul, operator.matmul, "matmul"}
ADD = {operator.add, torch.add, "add", "__add__"}
# Ops that keep the value of every element (casts, views); a router may put them anywhere.
VALUE_PRESERVING = {"float", "to", "type", "view", "reshape", "contiguous", "type_as"}


def is_call(node: fx.Node, targets: set) -> bool:
    """``node`` calls one of ``targets`` (functions, or method names)."""
    if node.op in ("call_function", "call_method"):
        return node.target in targets
    return False


def known_equal(a, b) -> bool:
    """``a == b`` for sizes that may be symbolic, true only when it holds for every value the
    symbols can take. Never guards: a plain ``==`` on SymInts would add a guard to the
    compiled graph (and recompile it whenever the comparison's outcome changes)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    eq = a == b
    return eq if isinstance(eq, bool) else bool(statically_known_true(eq))


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    """Shapes equal for every value of their symbols (see :func:`known_equal`)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(known_equal(x, y) for x, y in zip(a, b, strict=True))


def skip_value_preserving(node: fx.Node) -> fx.Node:
    while node.op == "call_method" and node.target in VALUE_PRESERVING and node.args:
        node = node.args[0]
    return node


def last_dim_softmax(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    shape = shape_of(node)
    return shape is not None and dim in (-1, len(shape) - 1)


def float_scores(node) -> tuple | None:
    """The shape of ``node`` if it is a floating tensor of rank >= 2 (scores over experts in
    its last dim), else None."""
    shape = shape_of(node)
    if shape is None or len(shape) < 2 or not val(node).is_floating_point():
        return None
    return shape


def upstream(site: TopKSite, targets: set, depth: int = 12) -> fx.Node | None:
    """The nearest node calling one of ``targets`` among the scores' ancestors of the scores'
    own shape (what a bias, mask or scaling between it and the top-k keeps), or None."""
    shape = shape_of(site.scores)
    seen, frontier = set(), [site.scores]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if is_call(n, targets) and same_shape(shape_of(n), shape):
                return n
            nxt.extend(a for a in n.all_input_nodes if same_shape(shape_of(a), shape))
        frontier = nxt
    return None


def token_independent(node: fx.Node) -> bool:
    """Computed from parameters and buffers only (a selection bias): every graph input it
    reads is a module's parameter or buffer (by Dynamo's input names), none is activation."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if "_parameters_" not in n.name and "_buffers_" not in n.name:
                return False
        elif n.op not in ("get_attr",):
            todo.extend(n.all_input_nodes)
    return True


def getitem_users(node: fx.Node) -> dict:
    """``{i: node[i]}`` for the tuple outputs of ``node`` the graph reads."""
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def declared_node(node: fx.Node) -> bool:
    """``node`` is the marker of a router declared with ``@capmoe_compile.router``."""
    from ...declare import declared_router

    return node.op == "call_function" and node.target is declared_router._opoverload


def reaches(start: fx.Node, stop, limit: int | None = None) -> bool:
    """Some node ``stop(n)`` is true of is ``start`` or reached from it through its users (an
    in-place op also reaches its target's later readers); at most ``limit`` nodes visited."""
    seen, todo = set(), [start]
    while todo and (limit is None or len(seen) < limit):
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n):
            return True
        todo.extend(n.users)
        if n.op == "call_method" and str(n.target).endswith("_") and n.args:
            todo.append(n.args[0])  # an in-place op feeds its target's later readers
    return False


@dataclasses.dataclass
class TopKSite:
    """One top-k over experts: the node and its values/indices outputs."""

    node: fx.Node
    values: fx.Node | None
    indices: fx.Node
    k: int
    num_experts: int
    scores: fx.Node  # the tensor top-k ran over: [..., E], rows = its leading dims flattened
    # a top-k made of k top-1 picks, each over the scores with the earlier picks set to -inf
    # (PhiMoE's sparsemixer): the picks' nodes, first to last; ``indices`` is their concat
    picks: tuple[fx.Node, ...] = ()

    @property
    def rows(self):
        """T: the number of token rows the scores hold (a SymInt under dynamic shapes)."""
        shape = shape_of(self.scores)
        t = shape[0]
        for d in shape[1:-1]:
            t = t * d
        return t


@dataclasses.dataclass
class RouterMatch:
    kind: str
    site: TopKSite
    probs: fx.Node  # P, or the logits when score_of_logits is set
    score_of_logits: str | None = None  # P = softmax/sigmoid(logits), for ranking only


# ------------------------------------------------------------------------------------------
# registries
# ------------------------------------------------------------------------------------------

SiteSpelling = Callable[[fx.Node], "TopKSite | None"]
SiteRewrite = Callable[[list], list]
Pattern = Callable[[TopKSite], "RouterMatch | None"]


@dataclasses.dataclass(frozen=True)
class Registered:
    """A member of one of the registries: its function, priority and what it says."""

    fn: Callable
    priority: int
    doc: str  # for a router pattern: its SPEC rule for P
    picks: bool = False  # a router pattern for sites made of sequential picks


#: Router patterns by priority, larger first. The list object is the one
#: ``routers.ROUTER_PATTERNS`` names: ``match_router`` tries its members in order.
ROUTER_PATTERNS: list[Pattern] = []
PATTERNS: dict[Pattern, Registered] = {}
SITE_SPELLINGS: list[Registered] = []
SITE_REWRITES: list[Registered] = []


def _insert(members: list, item, priority_of) -> None:
    """Insert ``item`` after every member of equal or higher priority."""
    i = 0
    while i < len(members) and priority_of(members[i]) >= priority_of(item):
        i += 1
    members.insert(i, item)


def register_router(*, priority: int, p_rule: str, picks: bool = False):
    """Decorator: ``pattern(site) -> RouterMatch or None`` joins :data:`ROUTER_PATTERNS`.

    ``priority`` orders the patterns (larger first: the first that recognises a site names
    its router kind); ``p_rule`` is how the pattern reads ``P``, in SPEC.md's words.
    ``picks=True``: the pattern is the only one asked about a site made of sequential top-1
    picks (``TopKSite.picks``)."""

    def deco(fn: Pattern) -> Pattern:
        if fn in PATTERNS:
            raise ValueError(f"router pattern {fn.__name__} is already registered")
        PATTERNS[fn] = Registered(fn, priority, p_rule, picks)
        _insert(ROUTER_PATTERNS, fn, lambda f: PATTERNS[f].priority)
        return fn

    return deco


def register_site(*, priority: int, doc: str = ""):
    """Decorator: ``spelling(node) -> TopKSite or None`` is asked about every graph node (the
    first spelling by priority that returns a site wins)."""

    def deco(fn: SiteSpelling) -> SiteSpelling:
        _insert(SITE_SPELLINGS, Registered(fn, priority, doc or fn.__doc__ or ""), _prio)
        return fn

    return deco


def register_site_rewrite(*, priority: int, doc: str = ""):
    """Decorator: ``rewrite(sites) -> sites`` runs on the graph's sites once all are found,
    larger priority first."""

    def deco(fn: SiteRewrite) -> SiteRewrite:
        _insert(SITE_REWRITES, Registered(fn, priority, doc or fn.__doc__ or ""), _prio)
        return fn

    return deco


def _prio(r: Registered) -> int:
    return r.priority


def p_rule(pattern: Pattern) -> str:
    """How ``pattern`` reads P (its SPEC rule), "" for a pattern not registered."""
    r = PATTERNS.get(pattern)
    return r.doc if r else ""
