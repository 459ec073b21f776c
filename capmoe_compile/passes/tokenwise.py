"""Proof that a layer's routing is token-wise: each token's ``S`` and ``W`` depend on it alone.

SPEC.md: "Token-wise routing is part of what a match proves." The expert region is verified on
selections the verifier chooses (``verify.identify_form``), which proves what the experts
compute from ``(x, S, W)``. It says nothing about how ``S`` and ``W`` came about: a router that
zeroes the weight of pairs past its own capacity (a cumsum position over a one-hot, a
per-expert count, a rank from a sort over tokens) folds a capacity of its own into ``W``, and
with capacity off the rewrite reproduces it exactly, yet with capacity on capmoe would stack
its capacity on the layer's and count the zeroed pairs as load.

Here the router side, from the experts' token input ``x`` to ``(S, W)``, is cut out of the
graph and run again on token sets made from the call's own tokens:

- reversed and shuffled (an order-dependent router shows there);
- half of the tokens, and then all of them, replaced by copies of one token: the copies
  overload that token's experts, so a capacity of the router's own binds on them even where it
  did not bind on the call (any capacity below ``T`` binds when all ``T`` tokens are copies),
  and a token-wise router gives every copy the same ``S`` and ``W``.

Row ``i`` of a trial is token ``index[i]`` of the call, so a token-wise router gives it row
``index[i]`` of the call's ``(S, W)``: compared as a dense ``[T, E]`` weight matrix (a pair
whose weight the router zeroed differs from one it kept). Any difference, or a router side
that cannot be cut out and re-run, leaves the layer as written.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from .fx_util import ancestors, descendants, mutates, shape
from .routers import known_equal

OWN_CAPACITY = (
    "the layer enforces its own capacity in its router: a token's selection or gate weights "
    "changed when only the other tokens changed ({how}); its routing is not token-wise, so "
    "capacity-aware dispatch on top of it would change what it computes"
)


OWN_CAPACITY_BY_POSITION = (
    "the layer enforces its own capacity in its router: it compares each pair's position in "
    "its expert's buffer (a cumsum over the tokens) with a bound and masks the pairs past it "
    "({masks}), so a token's routing depends on the tokens before it, even where the bound does "
    "not bind on this call; capacity-aware dispatch on top of it would change what it computes"
)


@dataclasses.dataclass
class RouterSide:
    """The nodes that compute ``(S, W)`` from the token input, and what else they read."""

    token_inputs: list[fx.Node]  # rows indexed by token: reindexed in every trial
    fixed_inputs: list[fx.Node]  # parameters, constants, sizes: the call's values
    nodes: list[fx.Node]  # topological order
    outs: list[fx.Node]  # (S, W) of a found layer, or routing-shaped tensors of a site
    num_experts: int = 0  # set for (S, W): compared as a dense [T, E] matrix
    # comparisons of a pair's position in its expert's buffer (a cumsum over the tokens) with
    # a bound, giving a per-pair mask: a capacity of the layer's own by its structure
    position_masks: list[fx.Node] = dataclasses.field(default_factory=list)

    def wanted(self) -> set[fx.Node]:
        return {*self.token_inputs, *self.fixed_inputs}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding: relative 1e-3 plus 5e-5 of the largest element (the dense
    weights compared here are fp32 copies; a zeroed or moved pair differs by far more)."""
    if a.shape != b.shape:
        return False
    same = a == b  # equal infinities (a masked_fill with -inf) are equal, not nan apart
    finite = b[torch.isfinite(b)]
    scale = (finite.abs().max() if finite.numel() else b.new_ones(())).clamp_min(1e-6)
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return bool((diff <= 1e-3 * (b.abs() + 0.05 * scale)).all())


def _token_rowed(node: fx.Node, T) -> bool:
    """Whether ``node``'s leading dims enumerate the layer's ``T`` tokens ([T, ...] or
    [B, S, ...] with B * S = T)."""
    sh = shape(node)
    if not sh:
        return False
    return known_equal(sh[0], T) or (len(sh) >= 2 and known_equal(sh[0] * sh[1], T))


def router_side(
    graph: fx.Graph,
    x: fx.Node,
    ids: fx.Node,
    weights: fx.Node,
    T,
    num_experts: int,
    kind: dict[fx.Node, str],
) -> RouterSide | str:
    """The router side of a layer whose experts read ``x``, or why it cannot be isolated.

    The router usually reads ``x`` itself; where it reads an earlier tensor (``x`` a norm or a
    view of it) the nearest token-rowed ancestor of ``x`` from which ``S`` and ``W`` are
    computed is taken instead."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = [x] + _token_ancestors(x, T, kind, order)
    side = _cut(candidates, [ids, weights], T, kind, order)
    if side is None:
        return (
            "its router's selection and weights could not be traced back to the token input "
            "alone, so that each token's routing can be proven to depend on it alone"
        )
    side.num_experts = num_experts
    return side


def site_probe(graph: fx.Graph, site, kind: dict[fx.Node, str]) -> RouterSide | None:
    """For a top-k site whose layer was not found (its dispatch leaves the graph's plain
    dataflow, as Switch-Transformers' and NLLB-MoE's do): the routing-shaped tensors computed
    from its token input after the top-k and before the next one ([T, E] or [T, k] rows, masks
    and weights alike), to be proven token-wise. None when there are none or no token input."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    T, E, k = site.rows, site.num_experts, site.k
    later = [
        order[n]
        for n in graph.nodes
        if n.op == "call_function" and order[n] > order[site.node] and _ranks_experts(n)
    ]
    end = min(later, default=len(order))
    reordered = _reordered_rows(site.node)
    positions, compared = _positions(site.node, T, order, end)
    routing = [
        d
        for d in sorted(descendants([site.node], inclusive=False), key=order.__getitem__)
        if order[d] < end and _token_rowed(d, T) and shape(d)[-1] in (E, k)
    ]
    outs = [
        d for d in routing if d not in reordered and d not in positions and kind.get(d) == "act"
    ][:8]
    masks = [c for c in compared if c in routing]
    if not outs and not masks:
        return None
    side = _cut(_token_ancestors(site.scores, T, kind, order), outs or masks, T, kind, order)
    if side is not None:
        side.position_masks = masks
    return side


_COMPARISONS = {"lt", "le", "gt", "ge", "eq", "ne"}


def _positions(start: fx.Node, T, order, end: int) -> tuple[set[fx.Node], list[fx.Node]]:
    """Descendants of ``start`` (before ``end``) that carry a pair's *position* in its
    expert's buffer: a ``cumsum`` over the token axis and what is computed from it, up to a
    comparison. Positions change under a token permutation for a dropless, token-wise router too
    (GShard/DeepSpeed buffer slots): they are no evidence of a capacity of the layer's own. The
    comparisons of a position with a bound (``mask *= locations < capacity``) are: returned
    second, in graph order."""

    def over_tokens(n: fx.Node) -> bool:
        if _op_name(n) != "cumsum" or not n.args:
            return False
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        sh = shape(n.args[0])
        if not isinstance(dim, int) or not sh:
            return False
        return known_equal(sh[dim], T) or (dim == 0 and _token_rowed(n.args[0], T))

    def compares(n: fx.Node) -> bool:
        return _op_name(n).removeprefix("__").removesuffix("__") in _COMPARISONS

    todo = [n for n in descendants([start], inclusive=False) if order[n] < end and over_tokens(n)]
    positions: set[fx.Node] = set()
    compared: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in positions or order[n] >= end:
            continue
        if compares(n):
            compared.add(n)
            continue
        positions.add(n)
        todo += list(n.users)
    return positions, sorted(compared, key=order.__getitem__)


_ROW_GATHERS = {"index_select", "take"}
_ROW_RESTORES = {"scatter", "scatter_", "index_copy", "index_copy_", "index_add", "index_add_",
                 "index_put", "index_put_", "setitem"}  # fmt: skip


def _op_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _reordered_rows(start: fx.Node) -> set[fx.Node]:
    """Descendants of ``start`` whose rows are not in token order: taken by a tensor index
    (``w[order]`` after an argsort by expert, ``index_select``) and what is computed from them,
    up to an op that puts rows back by index (``scatter``, ``index_add``, ``x[idx] = ...``).
    Such a tensor changes under a token permutation for a token-wise router too: it is no
    evidence of a capacity of the layer's own (sorted dispatches read it)."""

    def gathers(n: fx.Node) -> bool:
        if n.op not in ("call_function", "call_method"):
            return False
        if n.target is operator.getitem and len(n.args) > 1:
            idx = n.args[1]
            first = idx[0] if isinstance(idx, tuple) and idx else idx
            return isinstance(first, fx.Node)
        return _op_name(n) in _ROW_GATHERS

    out: set[fx.Node] = set()
    todo = [n for n in descendants([start], inclusive=False) if gathers(n)]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo += [u for u in n.users if _op_name(u) not in _ROW_RESTORES]
    return out


def _is_topk(n: fx.Node) -> bool:
    return getattr(n.target, "__name__", "") in ("topk", "argmax", "max") or n.target in (
        "topk",
        "argmax",
        "max",
    )


def _ranks_experts(n: fx.Node) -> bool:
    """A top-k / argmax / max over the last dimension: a next router stage, which ends a
    site's probe. One over another dimension (DeepSpeed's ``topk(mask, k=capacity, dim=0)``
    picks each expert's tokens: a capacity of the layer's own) is part of what it probes."""
    if not _is_topk(n):
        return False
    pos = 2 if _op_name(n) == "topk" else 1
    dim = n.kwargs.get("dim", n.args[pos] if len(n.args) > pos else None)
    if dim is None:
        return _op_name(n) == "topk"  # topk's default is the last dim; argmax/max: flattened
    sh = shape(n.args[0]) if n.args else None
    return isinstance(dim, int) and (dim == -1 or (sh is not None and dim == len(sh) - 1))


def _token_ancestors(node, T, kind, order) -> list[fx.Node]:
    """Token-rowed activations upstream of ``node``, nearest first (a few)."""
    return sorted(
        (
            a
            for a in ancestors([node], inclusive=False)
            if kind.get(a) == "act" and _token_rowed(a, T)
        ),
        key=order.__getitem__,
        reverse=True,
    )[:16]


def _cut(candidates, outs, T, kind, order) -> RouterSide | None:
    """The first candidate token input from which ``outs`` are computed with nothing else
    indexed by token, and the nodes between (None if no candidate is such)."""
    upstream = ancestors(outs, inclusive=False)
    for c in candidates:
        down = descendants([c], inclusive=False)
        if any(o not in down for o in outs):
            continue
        end = max(order[o] for o in outs)
        nodes = _with_updates((down & upstream) | set(outs), down, order, end)
        nodes |= _fresh_buffers(nodes, kind)
        outside = {a for n in nodes for a in n.all_input_nodes if a not in nodes and a is not c}
        token = [c] + sorted(
            (a for a in outside if kind.get(a) == "act" and _token_rowed(a, T)),
            key=order.__getitem__,
        )
        fixed = sorted(outside - set(token), key=order.__getitem__)
        if any(
            kind.get(a) == "act"
            and a.op != "placeholder"
            and shape(a)
            and not _token_free(a, T, kind)
            for a in fixed
        ):
            continue  # reads a computed activation not indexed by token: try further up
        return RouterSide(token, fixed, sorted(nodes, key=order.__getitem__), list(outs))
    return None


def _token_free(node: fx.Node, T, kind) -> bool:
    """Computed from no token-rowed activation (a buffer's ``.float()``: Inkling's selection
    bias): as much a fixed input of the call as the buffer itself."""
    return not any(kind.get(a) == "act" and _token_rowed(a, T) for a in ancestors([node]))


def _fresh_buffers(nodes: set[fx.Node], kind) -> set[fx.Node]:
    """Tensors made from no input (``torch.zeros(T, E).scatter_(1, ids, 1)``) that the router
    side updates in place: recreated in every trial. As fixed inputs they would hold the value
    the call left in them, the call's own routing, and each trial would add to it."""
    return {
        a
        for n in nodes
        if mutates(n) and n.args and isinstance(a := n.args[0], fx.Node)
        if a not in nodes
        and a.op == "call_function"
        and kind.get(a) == "const"
        and not a.all_input_nodes
    }


def _with_updates(nodes, down, order, end: int) -> set[fx.Node]:
    """``nodes`` plus the in-place updates of their tensors made before ``S`` and ``W`` are
    read (``gate[pos > cap] = 0`` is a ``setitem`` no later node reads by an edge)."""
    nodes = set(nodes)
    grew = True
    while grew:
        grew = False
        for n in down - nodes:
            if order[n] < end and mutates(n) and n.args and n.args[0] in nodes:
                nodes |= {n} | (ancestors([n], inclusive=False) & down)
                grew = True
    return nodes


def _subgraph(side: RouterSide) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in (*side.token_inputs, *side.fixed_inputs):
        env[n] = g.placeholder(n.name)
    for n in side.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in side.outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _reindex(v: Any, index: torch.Tensor, T: int) -> Any:
    """Rows of ``v`` (leading [T] or [B, S] with B*S = T) taken at ``index``."""
    if not isinstance(v, torch.Tensor):
        return v
    if v.shape[0] == T:
        return v[index.to(v.device)]
    flat = v.reshape(T, *v.shape[2:])
    return flat[index.to(v.device)].reshape(v.shape)


def _rows_of(v: Any) -> set[int]:
    """The token counts a tensor's leading dims can enumerate: [T, ...] or [B, S, ...]."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return set()
    return {v.shape[0]} | ({v.shape[0] * v.shape[1]} if v.dim() >= 2 else set())


def _dense(ids: torch.Tensor, w: torch.Tensor, E: int, T: int) -> torch.Tensor:
    """``(S, W)`` as a [T, E + 1] matrix (column E collects sentinel or out-of-range ids)."""
    ids = ids.reshape(T, -1).long()
    w = w.reshape(ids.shape).float()
    ids = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E))
    return torch.zeros(ids.shape[0], E + 1, device=w.device).scatter_add_(1, ids, w)


def _leading(v: torch.Tensor, T: int) -> tuple[int, ...]:
    """``v.shape[0]`` where ``v`` is [B, S, ...] with B * S = T (its rows are then B * S)."""
    return (v.shape[0],) if v.dim() >= 2 and v.shape[0] * v.shape[1] == T else ()


def _trials(T: int) -> list[tuple[str, torch.Tensor]]:
    """(what, index): row i of the trial is token index[i] of the call."""
    gen = torch.Generator().manual_seed(0)
    h = T // 2
    rest = torch.arange(h, T)
    return [
        ("tokens reversed", torch.arange(T).flip(0)),
        ("tokens shuffled", torch.randperm(T, generator=gen)),
        (
            "the first half replaced by copies of the last token",
            torch.cat([rest[-1:].expand(h), rest]),
        ),
        (
            "the second half replaced by copies of the first token",
            torch.cat([torch.arange(h), torch.zeros(T - h, dtype=torch.long)]),
        ),
        # all T tokens on one token's k experts: any capacity of the router's own below T
        # binds here, whatever the call's load was
        ("every token replaced by copies of one token", torch.full((T,), h, dtype=torch.long)),
    ]


def dependence(side: RouterSide, values: dict[fx.Node, Any], T: int) -> str | None:
    """Why the router side is not token-wise on the call's ``T`` tokens (None: it is)."""
    if side.position_masks:
        return OWN_CAPACITY_BY_POSITION.format(
            masks=", ".join(n.name for n in side.position_masks[:3])
        )
    if T < 2:
        return None  # one token: no other token to depend on
    sub = _subgraph(side)
    token = [values[n] for n in side.token_inputs]
    fixed = [values[n] for n in side.fixed_inputs]
    # Every token input and every output must enumerate exactly the T tokens, one row each
    # (a T that counted sequences would permute whole sequences only, and a [B, S, k] output
    # read as [B, S * k] rows would fold a sequence's tokens into one row): otherwise the
    # trials would not test what they claim, and the layer is left as written.
    outs_now = [values[o] for o in side.outs]
    if (
        any(T not in _rows_of(v) for v in token)
        or any(not isinstance(v, torch.Tensor) or v.numel() % T for v in outs_now)
        or (side.num_experts and outs_now[0].numel() != outs_now[1].numel())
        or any(v.dim() and v.shape[0] not in (T, *_leading(v, T)) for v in outs_now)
    ):
        return (
            "its router's inputs or outputs are not one row per token of the call's "
            f"{T} tokens, so each token's routing cannot be proven to depend on it alone"
        )

    def rows(outs) -> list[torch.Tensor]:
        if side.num_experts:
            return [_dense(outs[0], outs[1], side.num_experts, T)]
        return [o.reshape(T, -1).float() for o in outs]

    def run(index: torch.Tensor | None) -> list[torch.Tensor]:
        args = token if index is None else [_reindex(v, index, T) for v in token]
        args = args + [v.clone() if isinstance(v, torch.Tensor) else v for v in fixed]
        with torch.no_grad():
            return rows(sub(*args))

    real = run(None)
    if not all(
        _close(a, b) for a, b in zip(real, rows([values[o] for o in side.outs]), strict=True)
    ):
        return (
            "its router could not be re-run on its own to prove that each token's routing "
            "depends on that token alone"
        )
    for what, index in _trials(T):
        got = run(index)
        if not all(_close(g, r[index.to(r.device)]) for g, r in zip(got, real, strict=True)):
            return OWN_CAPACITY.format(how=what)
    return None
