"""A layer's expert region: from its router's top-k to the ``[T, H]`` node that combines
every result. Finds the selection ``S`` and gate weights ``W`` the experts consume, closes the
experts over what they read (parameters, constants, the token input ``x``), and refuses
regions whose in-place updates a reader outside would see. Also the graph preparation the
search needs: in-place updates threaded through the graph's edges (:func:`thread_inplace`)
and each node classified as parameter, constant or activation (:func:`classify_constants`)."""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any

import torch
from torch import fx

from . import routers
from .fx_util import (
    INPLACE_FUNCS,
    aliases_of,
    ancestors,
    descendants,
    is_alias,
    is_fresh,
    is_size,
    mutates,
    shape,
    val,
)
from .reports import Unmatched
from .routers import known_equal, same_shape


def _is_param_root(node: fx.Node, example: dict[fx.Node, Any]) -> bool:
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and isinstance(example.get(node), torch.nn.Parameter)


def classify_constants(graph: fx.Graph, example: dict[fx.Node, Any]) -> dict[fx.Node, str]:
    """'param' for nodes computed only from parameters, 'const' for nodes computed from no
    tensor input at all (aranges, sizes), 'act' otherwise."""
    kind: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            v = example.get(n)
            if _is_param_root(n, example):
                kind[n] = "param"
            elif isinstance(v, torch.Tensor):
                kind[n] = "act"
            else:
                kind[n] = "const"
        elif n.op == "get_attr":
            kind[n] = "param"
        else:
            ks = {kind.get(a, "act") for a in n.all_input_nodes}
            kind[n] = "act" if "act" in ks else ("param" if "param" in ks else "const")
    return kind


@dataclasses.dataclass
class Region:
    site: routers.TopKSite
    router: routers.RouterMatch
    out: fx.Node  # the [T, H] node the layer's routed output is
    x: fx.Node
    ids: fx.Node
    weights: fx.Node
    expert_nodes: list[fx.Node]  # topological order; computes out from x, ids, weights
    removable: list[fx.Node]  # region nodes to erase after the rewrite
    params: list[fx.Node]  # parameter roots the experts read
    roots: list[fx.Node]  # every graph input the expert subgraph needs


def find_region(graph: fx.Graph, match: routers.RouterMatch, kind: dict[fx.Node, str]) -> Region:
    site = match.site
    T = site.rows
    order = {n: i for i, n in enumerate(graph.nodes)}
    outs = _combining(site, T, order, side_paths=False)
    # Only where no node combines every result: the selection may also feed values computed
    # from the router's outputs alone, outside the experts (Inkling normalises its shared
    # experts' weights together with the selected experts' scores): SPEC.md, "Where capacity
    # applies". _region_through checks that such a side path reads no expert weight and no
    # token row.
    live: set[fx.Node] | None = None  # with side paths: what the graph's output reads
    if not outs:
        outs = _combining(site, T, order, side_paths=True)
        live = ancestors([n for n in graph.nodes if n.op == "output"])
    if not outs:
        raise Unmatched(
            "no single [T, H] tensor combines all of the top-k's results: they leave the graph "
            "another way (a graph break between router and experts, router outputs returned "
            "from the layer) or feed several results (a second router stage, a per-sequence "
            "[B, N, E, C] dispatch)"
        )
    # The first [T, *] node all routing flows through may be a dense [T, E] weight matrix
    # (experts combined by a one-hot einsum): then a later one is the layer's output.
    errors = []
    for out in outs:
        try:
            return _region_through(graph, match, kind, out, order, live)
        except Unmatched as e:
            errors.append(e)
    raise errors[-1]  # the last candidate is the widest region: its reason is the telling one


def _combining(site, T, order: dict[fx.Node, int], side_paths: bool) -> list[fx.Node]:
    """The float [T, *] nodes after the top-k that every use of its results flows into (with
    ``side_paths``: or leaves the region another way, not as a graph output)."""
    outs = []
    for c in sorted(descendants([site.node]), key=order.__getitem__):
        if c is site.node:
            continue
        sh = shape(c)
        v = val(c)
        if sh is None or len(sh) != 2 or not known_equal(sh[0], T) or not v.is_floating_point():
            continue
        reach = descendants([site.node], stop=c)
        if side_paths:  # a side path runs on past c: only what c is computed from counts
            reach &= ancestors([c])
        if any(u.op == "output" for n in reach for u in n.users):
            continue
        if side_paths or all(u in reach or u is c for n in reach for u in n.users):
            outs.append(c)
    return outs


def _dead_ends(unused: set[fx.Node], core: set[fx.Node], order) -> set[fx.Node]:
    """The nodes of ``unused`` computed from ``core`` (the region proper) and one another
    alone: the unread half of a ``torch.where`` in an experts loop, its sizes and the runtime
    asserts on them. Removed with the region (as a region found the plain way removes
    them); in-place updates are never among them."""
    dead: set[fx.Node] = set()
    for n in sorted(unused, key=order.__getitem__):
        impure_ok = n.op == "call_function" and "assert" in str(n.target)
        if mutates(n) or (n.is_impure() and not impure_ok):
            continue
        if all(a in core or a in dead for a in n.all_input_nodes):
            dead.add(n)
    return dead


def _side_path(region: set[fx.Node], out: fx.Node, live: set[fx.Node]) -> set[fx.Node]:
    """The region's nodes whose values also leave it (other than through ``out``) for a
    node the graph's output depends on (``live``), with everything in the region they are
    computed from."""
    leaving = [
        n for n in region if n is not out and any(u not in region and u in live for u in n.users)
    ]
    return ancestors(leaving) & region if leaving else set()


def _check_side_path(side: set[fx.Node], x: fx.Node, params: list[fx.Node]) -> None:
    """A side path must be the router's: no expert weight, no token row read."""
    expert_params = set(params)
    for n in side:
        read = [a for a in n.all_input_nodes if a is x or a in expert_params]
        if read:
            raise Unmatched(
                f"a value computed from the selection leaves the layer's experts "
                f"({n.name}) and reads {read[0].name}, an expert weight or the token input: "
                "not the router's own output"
            )


def _region_through(
    graph: fx.Graph,
    match: routers.RouterMatch,
    kind: dict[fx.Node, str],
    out: fx.Node,
    order: dict[fx.Node, int],
    live: set[fx.Node] | None = None,
) -> Region:
    """The expert region from ``match``'s top-k to ``out``, its [T, H] result."""
    site = match.site
    region = descendants([site.node], stop=out) | {out}
    side: set[fx.Node] = set()
    dead: set[fx.Node] = set()  # unused results in the region (the unread half of a where)
    if live is not None:  # side paths: one runs on past out: only what out is computed from
        core = region & ancestors([out])
        dead = _dead_ends(region - live, core, order)
        region = core
        side = _side_path(region, out, live)
    # W is read by the experts: a [T, k] float only the side path reads is not it
    feeding = ancestors(list(region - side)) if side else region
    ids, weights = _selection(site, region & feeding, order)
    router_side = ancestors([ids, weights]) | side
    # The experts are what the selection feeds, minus the router's tail that computes W from
    # the ids (DeepSeek-V3 gathers W from the scores at the selected ids).
    expert_set = (descendants([ids]) | descendants([weights])) & region
    expert_set -= router_side
    support, sizes, x_nodes = _close_experts(expert_set, ids, weights, router_side, kind)
    views = _read_through_views(graph, x_nodes, ids, weights, expert_set, region, order)
    if _like_reads_as_factories(graph, expert_set, x_nodes, region, order) or views:
        expert_set = ((descendants([ids]) | descendants([weights])) & region) - router_side
        support, sizes, x_nodes = _close_experts(expert_set, ids, weights, router_side, kind)
    cut = _dense_prefix_cut(expert_set, ids, weights, x_nodes, out, kind)
    if cut is not None:  # the experts start at ``cut``: what computes it stays outside
        expert_set = ((descendants([ids]) | descendants([weights])) & region) - router_side
        support, sizes, x_nodes = _close_experts(
            expert_set, ids, weights, router_side | {cut}, kind
        )
    x = _token_input(x_nodes, expert_set, out, site.rows)
    _check_no_alias_reads(expert_set | region, order)
    if side:
        _check_side_path(side, x, [a for a in support if kind.get(a) == "param"])
    for n in expert_set:
        if n.op == "call_method" and str(n.target).endswith("_") or n.target in INPLACE_FUNCS:
            target = n.args[0] if n.args else None
            # the experts' own accumulator (``out = torch.zeros(T, H)`` then ``index_add_``):
            # created from no input, recomputed inside the region on every run
            own = target in support and is_fresh(target)
            if isinstance(target, fx.Node) and target not in expert_set and not own:
                raise Unmatched(f"the experts mutate {target.name}, a tensor from outside")
    roots = [a for a in support if a.op in ("placeholder", "get_attr")] + sorted(
        sizes, key=order.__getitem__
    )
    # parameters in a fixed order: per-expert modules (``experts.3.w1``) grouped by expert
    params = sorted((a for a in roots if kind[a] == "param"), key=_param_key)
    nodes = sorted(expert_set | (support - set(roots)), key=order.__getitem__)
    removable = sorted((region | dead) - {ids, weights}, key=order.__getitem__)
    return Region(site, match, out, x, ids, weights, nodes, removable, params, roots)


_VIEWS = {"view", "reshape", "flatten", "contiguous"}


def _view_of(a: fx.Node, target: fx.Node) -> bool:
    """Whether ``target`` is ``a`` through reshapes only (``ids_BLK.view(T, k)``)."""
    cur = target
    while cur is not a:
        name = cur.target if cur.op == "call_method" else getattr(cur.target, "__name__", "")
        if cur.op not in ("call_method", "call_function") or name not in _VIEWS or not cur.args:
            return False
        cur = cur.args[0]
        if not isinstance(cur, fx.Node):
            return False
    return True


def _read_through_views(graph, x_nodes, ids, weights, expert_set, region, order) -> bool:
    """Experts that read the selection (or the weights) in the router's own shape as well as
    ``S`` [T, k] (torchtitan counts tokens per expert from ``ids_BLK`` and dispatches by
    ``ids_BLK.view(T, k)``) read it as a reshape of ``S``: the same values, now one input the
    rewrite replaces, not a second router tensor. Static shapes only."""
    changed = False
    for a in list(x_nodes):
        for sel in (ids, weights):
            a_shape = shape(a)
            if a is sel or not _view_of(a, sel) or not a_shape:
                continue
            if not all(type(d) is int for d in a_shape):
                continue
            users = [u for u in a.users if u in expert_set]
            chain = [sel]
            while chain[-1].args[0] is not a:
                chain.append(chain[-1].args[0])
            if not users or any(c.all_input_nodes != [c.args[0]] for c in chain):
                continue
            # the views of ``a`` move up to it (they read nothing else), so that the experts'
            # reads of ``a``, which may come before ``sel`` (a count taken earlier), follow it
            prev = a
            for c in reversed(chain):
                prev.append(c)
                order[c] = order[a] + 0.001 * (len(chain) - chain.index(c))
                prev = c
            with graph.inserting_after(sel):
                v = graph.call_method("reshape", (sel, a_shape))
            v.meta = dict(a.meta)
            order[v] = order[sel] + 0.0005
            region.add(v)
            for u in users:
                u.replace_input_with(a, v)
            changed = True
    return changed


def _selection(site, region: set[fx.Node], order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node]:
    """The selection ``S`` the experts consume (the top-k's indices through casts and views)
    and its gate weights ``W`` (the last [T, k] float node of the router's tail).

    A [T, k] float computed through a dispatch op (``w * (ids == e)``: one expert's share in a
    loop over experts; weights in sorted order) is the experts' use of W, not W."""
    tk = (site.rows, site.k)
    ids = site.indices
    weights = None
    # (a top-k spelled as a sort is the router's, not a dispatch's)
    masked = descendants([n for n in region if _is_dispatch(n) and n is not site.node])
    for n in sorted(region, key=order.__getitem__):
        v = val(n)
        if isinstance(v, torch.Tensor) and same_shape(tuple(v.shape), tk):
            if v.is_floating_point():
                if n not in masked:
                    weights = n
            elif n in descendants([site.indices]) and (
                weights is None or not same_shape(shape(ids), tk)  # [B, S, k] flattened later
            ):
                ids = n
    if weights is None:
        raise Unmatched("no [T, k] gate weights found between the router and the experts")
    if not same_shape(shape(ids), tk):
        raise Unmatched(f"the top-k's indices never take the shape [T, k] = {tk}")
    return ids, weights


def _close_experts(expert_set, ids, weights, router_side, kind):
    """Pull into ``expert_set`` (in place) what the experts need: parameter/constant
    computations (``support``, recomputed inside the subgraph) and activations derived from
    the token input off the router's path (e.g. a repeat_interleave of x). Stops at the
    router's own ancestors and the graph's inputs (``x_nodes``: one of them is x); sizes read
    off activations (x.shape under dynamic shapes) become inputs of the subgraph."""
    support: set[fx.Node] = set()
    sizes: set[fx.Node] = set()
    x_nodes: set[fx.Node] = set()
    todo = [a for n in expert_set for a in n.all_input_nodes]
    while todo:
        a = todo.pop()
        if a in expert_set or a in support or a in (ids, weights):
            continue
        if kind.get(a) in ("param", "const"):
            support.add(a)
            todo.extend(a.all_input_nodes)
        elif a.op != "placeholder" and is_size(val(a)):
            sizes.add(a)
        elif a in router_side or a.op == "placeholder":
            x_nodes.add(a)
        else:
            expert_set.add(a)
            todo.extend(a.all_input_nodes)
    return support, sizes, x_nodes


def _dense_prefix_cut(expert_set, ids, weights, x_nodes, out, kind) -> fx.Node | None:
    """The ``[T, H]`` node where the experts start, when they read the token input through a
    computation of their own that every token goes through before any routing is applied
    (MuseSpark: ``pre_expert_norm(pre_expert_proj(x))``, then the experts on its rows, the
    router on ``x`` itself). That prefix is dense and token-wise: left in the graph, it
    computes what it did, and the experts' input is its result. ``None`` where there is no
    such node, or where cutting there changes nothing the experts could be identified by (no
    parameter read in the prefix and the token input already has the output's shape).

    A candidate ``c`` (shape of ``out``, not derived from the selection or its weights) is
    taken only if the experts read the prefix through ``c`` alone and do not read the token
    input beside it; of those, the one that leaves the most of the prefix outside."""
    routed = descendants([ids]) | descendants([weights])
    prefix = {n for n in expert_set if n not in routed}
    out_shape = shape(out)
    best, best_size = None, 0
    for c in prefix:
        if not same_shape(shape(c), out_shape):
            continue
        before = ancestors([c]) & prefix
        rest = expert_set - before
        if any(a in before and a is not c for n in rest for a in n.all_input_nodes):
            continue
        if any(a in x_nodes for n in rest for a in n.all_input_nodes):
            continue
        if len(before) > best_size:
            best, best_size = c, len(before)
    if best is None:
        return None
    before = ancestors([best]) & prefix
    reads_param = any(kind.get(a) == "param" for n in before for a in n.all_input_nodes)
    hidden = [a for a in x_nodes if shape(a) is not None and len(shape(a)) == 2]
    fits = len(hidden) == 1 and len(x_nodes) == 1 and same_shape(shape(hidden[0]), out_shape)
    return best if reads_param or not fits else None


def _token_input(x_nodes: set[fx.Node], expert_set: set[fx.Node], out: fx.Node, T) -> fx.Node:
    """The one [T, H] activation the experts read (``expert_set`` loses the flattening view
    when the experts flatten the block's [B, S, H] input themselves)."""
    if len(x_nodes) == 1 and not same_shape(shape(next(iter(x_nodes))), shape(out)):
        (src,) = x_nodes
        views = [
            n
            for n in expert_set
            if n.op == "call_method"
            and n.target in ("view", "reshape")
            and n.args[0] is src
            and same_shape(shape(n), shape(out))
        ]
        if len(views) == 1:
            expert_set.discard(views[0])
            x_nodes = {views[0]}
    hidden = [a for a in x_nodes if shape(a) is not None and len(shape(a)) == 2]
    others = x_nodes - set(hidden)
    if len(hidden) != 1 or others:
        names = ", ".join(sorted(a.name for a in x_nodes))
        raise Unmatched(f"the experts read activations other than one [T, H] input: {names}")
    x = hidden[0]
    if not same_shape(shape(x), shape(out)) or not known_equal(shape(x)[0], T):
        raise Unmatched(f"token input {shape(x)} and output {shape(out)} disagree")
    return x


def _check_no_alias_reads(inside: set[fx.Node], order: dict[fx.Node, int]) -> None:
    """Raise if a node outside the layer reads a tensor the experts update in place, after the
    update, by an edge :func:`thread_inplace` did not move: that reader would see the experts'
    result through the tensor itself, which the rewrite does not replace (only ``out``'s uses
    are), so it would read the tensor as it was before the experts ran. Views share the
    tensor's storage, so the readers of every view of it count, whenever the view was taken
    (``seen = out.view(...)`` before the loop, returned after it)."""
    for n in inside:
        if not (mutates(n) and n.args and isinstance(n.args[0], fx.Node)):
            continue
        for alias in aliases_of(n.args[0]):
            late = [
                u
                for u in alias.users
                if u not in inside and order[u] > order[n] and not is_alias(u)
            ]
            if late:
                raise Unmatched(
                    f"{late[0].name} reads {alias.name} after the experts update it in place "
                    f"({n.name}), not through the layer's output: the rewrite cannot replace it"
                )


def _param_key(node: fx.Node) -> tuple:
    """Sort key of a parameter input: its name with every number compared as a number, so
    ``experts.10.w1`` follows ``experts.9.w1`` and an expert's tensors stay together."""
    parts = re.split(r"(\d+)", node.name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


# Ops through which the experts *use* the selection: comparing ids with an expert's index,
# sorting pairs by expert. A [T, k] float computed through one (``w * (ids == e)``, or the
# sorted weights when k == 1) is dispatch, never the router's W.
_DISPATCH_OPS = {
    operator.eq,
    operator.ne,
    torch.eq,
    torch.ne,
    torch.sort,
    torch.argsort,
    "eq",
    "ne",
    "__eq__",
    "__ne__",
    "sort",
    "argsort",
}


def _is_dispatch(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _DISPATCH_OPS


def thread_inplace(graph: fx.Graph) -> None:
    """Make the graph's edges show what in-place updates of its own tensors feed.

    ``acc.index_add_(0, rows, y)`` in a loop over experts returns ``acc`` itself, but Dynamo's
    graph has later readers of ``acc`` read the node that created it: the updates have no
    users, and the layer's output looks like a zero tensor no expert flows into. Here every
    reader of ``acc`` after an in-place method call on it reads that call's result instead (the
    same tensor object: nothing computes differently), so the chain of updates is the path
    from the router to the output. Only tensors created by the graph (not inputs, which other
    code may alias) and never viewed before an update are threaded."""
    _setitem_as_index_put(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    root_of: dict[fx.Node, fx.Node] = {}  # an update -> the tensor it updates
    for n in list(graph.nodes):
        if not (
            n.op == "call_method"
            and mutates(n)
            and n.args
            and isinstance(n.args[0], fx.Node)
            and isinstance(val(n), torch.Tensor)
        ):
            continue
        base = n.args[0]
        root = root_of.get(base, base)
        if root.op not in ("call_function", "call_method"):
            continue
        # a view of the tensor taken before this update aliases it unseen: leave it
        if any(u is not n and order[u] < order[n] and is_alias(u) for u in root.users):
            continue
        for u in list(base.users):
            if u is not n and order[u] > order[n]:
                u.replace_input_with(base, n)
        root_of[n] = root


_LIKE = {torch.zeros_like: torch.zeros, torch.ones_like: torch.ones,
         torch.empty_like: torch.empty, torch.full_like: torch.full}  # fmt: skip


def _like_reads_as_factories(graph, expert_set, x_nodes, region, order) -> bool:
    """The experts' ``torch.zeros_like(t, dtype=...)`` (and ``ones/empty/full_like``) of a
    router tensor ``t`` (contiguous, of static shape) as ``torch.zeros(shape, dtype=...,
    device=...)``: the same tensor, but one that reads nothing. ``t`` is read for its shape
    alone (torchtitan builds its routing map as ``zeros_like(scores, dtype=bool).scatter_(...)``),
    and a read of a router tensor for its shape is no dataflow from the router. Only the
    experts' reads change (a router's own ``full_like``, Llama-4's ``-inf`` row, stays what
    its pattern recognises); symbolic shapes, strided inputs and other keywords
    (``memory_format``, ``requires_grad``) are left as they are."""
    changed = False
    for n in sorted(expert_set, key=lambda n: n.name):
        if n.op != "call_function" or n.target not in _LIKE or not n.args:
            continue
        if n.args[0] not in x_nodes:
            continue
        src = val(n.args[0])
        if (
            not isinstance(src, torch.Tensor)
            or not all(type(d) is int for d in src.shape)
            or not src.is_contiguous()
            or set(n.kwargs) - {"dtype", "device"}
            or any(isinstance(a, fx.Node) for a in n.args[1:])
        ):
            continue
        kwargs = {
            "dtype": n.kwargs.get("dtype") or src.dtype,
            "device": n.kwargs.get("device") or src.device,
        }
        with graph.inserting_before(n):
            new = graph.call_function(_LIKE[n.target], (tuple(src.shape), *n.args[1:]), kwargs)
        new.meta = dict(n.meta)
        order[new] = order[n] - 0.5
        n.replace_all_uses_with(new)
        expert_set.discard(n)
        region.discard(n)
        graph.erase_node(n)
        changed = True
    return changed


def _setitem_as_index_put(graph: fx.Graph) -> None:
    """``y[idx] = v`` with tensor indices only (``y[rows] += ...``, ``out[mask] = ...``: a loop
    over experts writing each expert's rows) as ``y.index_put_((idx,), v)``: the same update
    (``Tensor.__setitem__`` with tensor indices is ``index_put_``), but a method that returns
    ``y``, so :func:`thread_inplace` can make later readers of ``y`` read it. Indices with
    slices, ints or ``None`` (writes into a view) are left as they are."""
    for n in list(graph.nodes):
        if not (n.op == "call_function" and n.target is operator.setitem and len(n.args) == 3):
            continue
        base, idx, value = n.args
        idx = idx if isinstance(idx, tuple) else (idx,)
        if (
            n.kwargs
            or n.users
            or not isinstance(base, fx.Node)
            or not isinstance(val(base), torch.Tensor)
            or not idx
            or not all(isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor) for i in idx)
            or not (isinstance(value, fx.Node) and isinstance(val(value), torch.Tensor))
        ):
            continue
        with graph.inserting_before(n):
            put = graph.call_method("index_put_", (base, idx, value))
        put.meta = dict(n.meta)
        put.meta["example_value"] = val(base)
        graph.erase_node(n)


def extract(region: Region) -> fx.GraphModule:
    """The expert subgraph as a module: (x, ids, weights, *roots) -> out."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in (region.x, region.ids, region.weights, *region.roots):
        env[n] = g.placeholder(n.name)
    for n in region.expert_nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[region.out])
    return fx.GraphModule(torch.nn.Module(), g)
