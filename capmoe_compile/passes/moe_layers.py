"""Find MoE layers in a Dynamo FX graph and rewrite them into capmoe ops.

A layer is found from its router (``routers.py``): a top-k over expert scores. Its *expert
region* is every node between that top-k and the first ``[T, H]`` node that all of the
top-k's data must flow through (its post-dominator): dispatch, the experts, the combine.
Inside the region the passes find the selection ``S`` (ids ``[T, k]``) and the gate weights
``W`` (``[T, k]``) the experts consume, the token input ``x`` and the expert parameters.

Nothing is trusted by name. Before a layer is rewritten, the region is cut out of the graph
and run on the call's real inputs and on random selections, and an :class:`ExpertForm` must
reproduce it (``experts.py``). A layer that fails any check is left exactly as written, and
the reason is recorded for ``explain``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .. import pipeline
from ..experts import ACTIVATIONS, ExpertForm, moe_experts_reference
from ..routing import capacity
from . import routers, tokenwise
from .routers import known_equal, same_shape

log = logging.getLogger("capmoe_compile")
#: INFO records of what the passes are doing now (no output unless a handler is attached:
#: ``capmoe_compile.tools.progress`` shows them as a status line on a terminal)
progress_log = logging.getLogger("capmoe_compile.progress")
_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv}


@dataclasses.dataclass
class LayerReport:
    """What the passes found for one router-like site (``explain`` prints these)."""

    name: str
    matched: bool
    reason: str = ""
    num_experts: int = 0
    top_k: int = 0
    router: str = ""
    dispatch: str = ""
    experts: str = ""
    tokens: int | None = None
    capacity: int | None = None
    padding: str = ""  # how padding rows are treated, or why they cannot be excluded
    lowering: str = ""  # what runs the experts (see _rewrite), or the EP form and why
    options: dict = dataclasses.field(default_factory=dict)
    form: ExpertForm | None = None  # the verified expert form (matched layers)
    # the expert parameters as the compiled call saw them, in ``form.roles`` order
    params: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    # the graph input each of ``params`` is (None: a constant of the graph), so that a later
    # call of the same graph can name its own parameters (``explain``)
    param_inputs: list = dataclasses.field(default_factory=list, repr=False, compare=False)


class Unmatched(Exception):
    """A site the passes will not rewrite; the message is the reason."""


def _val(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _shape(node):
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\._modules\['([^']+)'\]", r".\1", path).strip(".")


def _layer_name(site_node: fx.Node, out_node: fx.Node) -> str:
    a, b = _module_path(site_node).split("."), _module_path(out_node).split(".")
    common = [x for x, y in zip(a, b, strict=False) if x == y]
    n = len(list(itertools.takewhile(lambda p: p[0] == p[1], zip(a, b, strict=False))))
    if ".".join(common[:n]):
        return ".".join(common[:n])
    # The MoE block is the compiled module itself: name it by its class.
    for node in (site_node, out_node):
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            return getattr(cls, "__name__", str(cls))
    return _source_location(site_node)


def _site_name(node: fx.Node) -> str:
    """Where a router-like site is, for reports: its module path, else its source line."""
    return _module_path(node) or _source_location(node)


def _source_location(node: fx.Node) -> str:
    """``forward (model.py:32)`` for a node of the compiled function or root module itself,
    which has no module path (its source line, from Dynamo's stack trace)."""
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.meta.get("stack_trace") or "")
    if not found:
        return node.name
    file, line, func = found[-1]
    return f"{func} ({file.rsplit('/', 1)[-1]}:{line})"


def _descendants(start: list[fx.Node], stop: fx.Node | None = None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n in seen or n is stop:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def _ancestors(start: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _is_param_root(node: fx.Node, example: dict[fx.Node, Any]) -> bool:
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and isinstance(example.get(node), torch.nn.Parameter)


def _classify_constants(graph: fx.Graph, example: dict[fx.Node, Any]) -> dict[fx.Node, str]:
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


def _find_region(graph: fx.Graph, match: routers.RouterMatch, kind: dict[fx.Node, str]) -> Region:
    site = match.site
    T = site.rows
    order = {n: i for i, n in enumerate(graph.nodes)}
    outs = []
    for c in sorted(_descendants([site.node]), key=order.__getitem__):
        if c is site.node:
            continue
        sh = _shape(c)
        v = _val(c)
        if sh is None or len(sh) != 2 or not known_equal(sh[0], T) or not v.is_floating_point():
            continue
        reach = _descendants([site.node], stop=c)
        if not any(u.op == "output" for n in reach for u in n.users) and all(
            u in reach or u is c for n in reach for u in n.users
        ):
            outs.append(c)
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
            return _region_through(graph, match, kind, out, order)
        except Unmatched as e:
            errors.append(e)
    raise errors[-1]  # the last candidate is the widest region: its reason is the telling one


def _region_through(
    graph: fx.Graph,
    match: routers.RouterMatch,
    kind: dict[fx.Node, str],
    out: fx.Node,
    order: dict[fx.Node, int],
) -> Region:
    """The expert region from ``match``'s top-k to ``out``, its [T, H] result."""
    site = match.site
    region = _descendants([site.node], stop=out) | {out}
    ids, weights = _selection(site, region, order)
    router_side = _ancestors([ids, weights])
    # The experts are what the selection feeds, minus the router's tail that computes W from
    # the ids (DeepSeek-V3 gathers W from the scores at the selected ids).
    expert_set = (_descendants([ids]) | _descendants([weights])) & region
    expert_set -= router_side
    support, sizes, x_nodes = _close_experts(expert_set, ids, weights, router_side, kind)
    x = _token_input(x_nodes, expert_set, out, site.rows)
    _check_no_alias_reads(expert_set | region, order)
    for n in expert_set:
        if n.op == "call_method" and str(n.target).endswith("_") or n.target in _INPLACE_FUNCS:
            target = n.args[0] if n.args else None
            # the experts' own accumulator (``out = torch.zeros(T, H)`` then ``index_add_``):
            # created from no input, recomputed inside the region on every run
            own = target in support and _is_fresh(target)
            if isinstance(target, fx.Node) and target not in expert_set and not own:
                raise Unmatched(f"the experts mutate {target.name}, a tensor from outside")
    roots = [a for a in support if a.op in ("placeholder", "get_attr")] + sorted(
        sizes, key=order.__getitem__
    )
    # parameters in a fixed order: per-expert modules (``experts.3.w1``) grouped by expert
    params = sorted((a for a in roots if kind[a] == "param"), key=_param_key)
    nodes = sorted(expert_set | (support - set(roots)), key=order.__getitem__)
    removable = sorted(region - {ids, weights}, key=order.__getitem__)
    return Region(site, match, out, x, ids, weights, nodes, removable, params, roots)


def _selection(site, region: set[fx.Node], order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node]:
    """The selection ``S`` the experts consume (the top-k's indices through casts and views)
    and its gate weights ``W`` (the last [T, k] float node of the router's tail).

    A [T, k] float computed through a dispatch op (``w * (ids == e)``: one expert's share in a
    loop over experts; weights in sorted order) is the experts' use of W, not W."""
    tk = (site.rows, site.k)
    ids = site.indices
    weights = None
    # (a top-k spelled as a sort is the router's, not a dispatch's)
    masked = _descendants([n for n in region if _is_dispatch(n) and n is not site.node])
    for n in sorted(region, key=order.__getitem__):
        v = _val(n)
        if isinstance(v, torch.Tensor) and same_shape(tuple(v.shape), tk):
            if v.is_floating_point():
                if n not in masked:
                    weights = n
            elif n in _descendants([site.indices]) and (
                weights is None or not same_shape(_shape(ids), tk)  # [B, S, k] flattened later
            ):
                ids = n
    if weights is None:
        raise Unmatched("no [T, k] gate weights found between the router and the experts")
    if not same_shape(_shape(ids), tk):
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
        elif a.op != "placeholder" and _is_size(_val(a)):
            sizes.add(a)
        elif a in router_side or a.op == "placeholder":
            x_nodes.add(a)
        else:
            expert_set.add(a)
            todo.extend(a.all_input_nodes)
    return support, sizes, x_nodes


def _token_input(x_nodes: set[fx.Node], expert_set: set[fx.Node], out: fx.Node, T) -> fx.Node:
    """The one [T, H] activation the experts read (``expert_set`` loses the flattening view
    when the experts flatten the block's [B, S, H] input themselves)."""
    if len(x_nodes) == 1 and not same_shape(_shape(next(iter(x_nodes))), _shape(out)):
        (src,) = x_nodes
        views = [
            n
            for n in expert_set
            if n.op == "call_method"
            and n.target in ("view", "reshape")
            and n.args[0] is src
            and same_shape(_shape(n), _shape(out))
        ]
        if len(views) == 1:
            expert_set.discard(views[0])
            x_nodes = {views[0]}
    hidden = [a for a in x_nodes if _shape(a) is not None and len(_shape(a)) == 2]
    others = x_nodes - set(hidden)
    if len(hidden) != 1 or others:
        names = ", ".join(sorted(a.name for a in x_nodes))
        raise Unmatched(f"the experts read activations other than one [T, H] input: {names}")
    x = hidden[0]
    if not same_shape(_shape(x), _shape(out)) or not known_equal(_shape(x)[0], T):
        raise Unmatched(f"token input {_shape(x)} and output {_shape(out)} disagree")
    return x


def _check_no_alias_reads(inside: set[fx.Node], order: dict[fx.Node, int]) -> None:
    """Raise if a node outside the layer reads a tensor the experts update in place, after the
    update, by an edge :func:`_thread_inplace` did not move: that reader would see the experts'
    result through the tensor itself, which the rewrite does not replace (only ``out``'s uses
    are), so it would read the tensor as it was before the experts ran. Views share the
    tensor's storage, so the readers of every view of it count, whenever the view was taken
    (``seen = out.view(...)`` before the loop, returned after it)."""
    for n in inside:
        if not (_mutates(n) and n.args and isinstance(n.args[0], fx.Node)):
            continue
        for alias in _aliases_of(n.args[0]):
            late = [
                u
                for u in alias.users
                if u not in inside and order[u] > order[n] and not _is_alias(u)
            ]
            if late:
                raise Unmatched(
                    f"{late[0].name} reads {alias.name} after the experts update it in place "
                    f"({n.name}), not through the layer's output: the rewrite cannot replace it"
                )


def _aliases_of(node: fx.Node) -> set[fx.Node]:
    """``node``, the tensors it is a view of, and every view of those (transitively): the
    nodes that share its storage by way of view ops."""
    base = node
    while _is_alias(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    seen, todo = {base}, [base]
    while todo:
        for u in todo.pop().users:
            if u not in seen and _is_alias(u) and u.args and u.args[0] in seen:
                seen.add(u)
                todo.append(u)
    return seen


_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full}
_FACTORY_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full"}


def _is_fresh(node: fx.Node) -> bool:
    """A tensor a factory creates (not a view of anything)."""
    if node.op == "call_function":
        return node.target in _FACTORIES
    return node.op == "call_method" and node.target in _FACTORY_METHODS


def _param_key(node: fx.Node) -> tuple:
    """Sort key of a parameter input: its name with every number compared as a number, so
    ``experts.10.w1`` follows ``experts.9.w1`` and an expert's tensors stay together."""
    parts = re.split(r"(\d+)", node.name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


_VIEWS = {"view", "reshape", "contiguous", "to", "float", "type_as"}
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


def _is_size(v) -> bool:
    """A size (int, SymInt, torch.Size, or a tuple of them), not data: the tuple a ``chunk``
    or ``split`` returns holds tensors and is data."""
    if isinstance(v, (int, torch.SymInt)):
        return True
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_size(e) for e in v)


def _hint(size) -> int:
    """The value a (possibly symbolic) size has in the call being compiled."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return optimization_hint(size)


def _input_name(node: fx.Node) -> str:
    """The name a user knows a graph input by: ``attention_mask``, not Dynamo's placeholder
    ``l_kwargs_attention_mask_`` (the last key or attribute of the input's source)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    text = getattr(source, "name", None)
    if isinstance(text, str):
        m = re.search(r"\[['\"]([^'\"]+)['\"]\]$|\.(\w+)$", text)
        if m:
            return m.group(1) or m.group(2)
    return re.sub(r"^[lL]_(kwargs_|args_)?", "", node.name).rstrip("_") or node.name


def _sequence_tie(
    graph: fx.Graph, x: fx.Node, layer_path: str
) -> tuple[fx.Node | None, fx.Node | None, str]:
    """The [B, S, H] tensor the layer's rows were flattened from, and the model's 2-D attention
    mask to tie them to. Returns (seq_node, mask_node, explanation).

    The tie is a relation checked on every call, not a fact proven at compile time:
    ``capmoe::route_layer`` excludes padding rows only when the mask's shape equals the rows'
    [B, S] on that call (:func:`capmoe_compile.ops.padding_rows`). So every graph Dynamo builds
    for a model treats padding the same way, whether its sizes are static, duck-sized or
    separate symbols after an automatic-dynamic recompile (where ``attention_mask`` and the
    hidden states get different batch symbols that no compile-time proof can equate).
    Here the mask is only chosen: the 2-D ``*attention_mask*`` input whose shape equals [B, S]
    in the call being compiled. In an encoder-decoder graph, layers under a ``decoder`` module
    only take ``decoder_attention_mask`` and the others only a mask without ``decoder_``.
    """
    T = _val(x).shape[0]
    node = x
    seq = None
    for _ in range(8):
        v = _val(node)
        if isinstance(v, torch.Tensor) and v.dim() == 3 and known_equal(v.shape[0] * v.shape[1], T):
            seq = node
            break
        if node.op == "call_method" and node.target in _VIEWS and node.args:
            node = node.args[0]
        else:
            break
    masks = [
        ph
        for ph in graph.find_nodes(op="placeholder")
        if "attention_mask" in ph.name
        and isinstance(_val(ph), torch.Tensor)
        and _val(ph).dim() == 2
        and not any(w in ph.name for w in ("encoder", "cross", "head"))
    ]
    if any("decoder_" in ph.name for ph in graph.find_nodes(op="placeholder")):
        in_decoder = "decoder" in layer_path.split(".")[0:3] or ".decoder" in layer_path
        masks = [m for m in masks if ("decoder_" in m.name) == in_decoder]
    if seq is None:
        why = "rows are not a reshape of a [B, S, H] tensor: all rows count"
        return (
            None,
            None,
            why
            + (f" (the graph has {_input_name(masks[0])}, but it cannot be tied)" if masks else ""),
        )
    B, S = (_hint(d) for d in _val(seq).shape[:2])
    fits = [m for m in masks if tuple(_hint(d) for d in _val(m).shape) == (B, S)]
    if len(fits) > 1:
        names = ", ".join(_input_name(m) for m in fits)
        return seq, None, f"several attention masks fit the rows ({names}): all rows count"
    if fits:
        where = _input_name(fits[0])
        return seq, fits[0], f"padding excluded where {where} is [B, S] (checked per call)"
    return seq, None, "no 2-D attention_mask input of shape [B, S]: all rows count"


def _extract(region: Region) -> fx.GraphModule:
    """The expert subgraph as a module: (x, ids, weights, *roots) -> out."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in (region.x, region.ids, region.weights, *region.roots):
        env[n] = g.placeholder(n.name)
    for n in region.expert_nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[region.out])
    return fx.GraphModule(torch.nn.Module(), g)


def _gate_variants(nodes: list[fx.Node]) -> list[tuple[float | None, float]]:
    """Clamp limits and gate scales the region's own code holds, as (limit, alpha) pairs for
    the clamped/scaled gating forms (GPT-OSS: ``clamp(max=7)``, ``sigmoid(g * 1.702)``).

    Only candidates: a form built from them passes only if it reproduces the region."""
    limits: set[float | None] = {None}
    alphas: set[float] = {1.0}
    for n in nodes:
        name = str(getattr(n.target, "__name__", n.target))
        if name in ("clamp", "clip", "clamp_max"):
            for v in (*n.args[1:], *n.kwargs.values()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    limits.add(abs(float(v)))
        elif name in ("mul", "__mul__"):
            for v in n.args:
                if isinstance(v, float) and v not in (0.0, 1.0):
                    alphas.add(v)
    # The region's own constants first: a trial whose activations never reach a clamp cannot
    # tell a clamped form from an unclamped one (the "large" trial tries to), and the form
    # built from what the code holds is the faithful one.
    out = [
        (lim, a)
        for lim in sorted(limits, key=lambda v: 0 if v is None else -v)
        for a in sorted(alphas, key=lambda v: v == 1.0)
    ]
    return out[:16]  # a handful of constants in any real expert


def _softcaps(nodes: list[fx.Node]) -> list[tuple[float, float]]:
    """(gate, up) softcap pairs from the float divisors the region's code holds (Inkling-2's
    ``tanh(x / c) * c``), for the softcapped gating forms; candidates only."""
    divs = []
    for n in nodes:
        name = str(getattr(n.target, "__name__", n.target))
        if name in ("truediv", "div", "__truediv__") and len(n.args) > 1:
            v = n.args[1]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v not in divs:
                divs.append(float(v))
    return [(a, b) for a in divs[:4] for b in divs[:4]]


def _candidate_forms(
    params: list[torch.Tensor],
    H: int,
    gates: list[tuple[float | None, float]] = (),
    softcaps: list[tuple[float, float]] = (),
) -> list[ExpertForm]:
    """Every expert form the parameter shapes admit (stacked parameters, leading dim E).

    ``gates``: (limit, alpha) pairs for clamped/scaled gated forms (:func:`_gate_variants`),
    tried after the plain forms, with gate/up interleaved or split and ``up`` shifted by 0 or 1."""
    mats = [i for i, p in enumerate(params) if p.dim() == 3]
    vecs = [i for i, p in enumerate(params) if p.dim() == 2]
    if len(mats) not in (2, 3) or len(vecs) > len(mats):
        return []
    role_sets = (
        [("gate_up", "down"), ("up", "down")] if len(mats) == 2 else [("gate", "up", "down")]
    )
    forms = []
    for roles in role_sets:
        for perm in itertools.permutations(mats):
            w = dict(zip(roles, (params[i].shape[1:] for i in perm), strict=True))
            tr_options = []
            for r in roles:
                a, b = w[r]
                ok = []
                if (b if r != "down" else a) == H:
                    ok.append(False)
                if (a if r != "down" else b) == H:
                    ok.append(True)
                tr_options.append(ok)
            for trs in itertools.product(*tr_options):
                outdim = {r: (w[r][1] if t else w[r][0]) for r, t in zip(roles, trs, strict=True)}
                for bias_roles in itertools.permutations(roles, len(vecs)):
                    if any(
                        params[v].shape[1] != outdim[r]
                        for v, r in zip(vecs, bias_roles, strict=True)
                    ):
                        continue
                    order = list(perm) + vecs
                    names = list(roles) + ["b_" + r for r in bias_roles]
                    by_index = dict(zip(order, names, strict=True))
                    full = tuple(by_index[i] for i in range(len(params)))
                    transposed = tuple(r for r, t in zip(roles, trs, strict=True) if t)
                    gfs = (True, False) if "gate_up" in roles else (True,)
                    for act in ACTIVATIONS:
                        for gf in gfs:
                            forms.append(ExpertForm(full, act, transposed, gf, True))
                    if "down" not in roles or not ({"gate_up", "gate"} & set(roles)):
                        continue
                    for cap in softcaps:
                        for gf in gfs:
                            forms.append(
                                ExpertForm(full, "silu", transposed, gf, True, softcap=cap)
                            )
                    for limit, alpha in gates:
                        for inter in (False, True) if "gate_up" in roles else (False,):
                            for shift in (0.0, 1.0):
                                if limit is None and alpha == 1.0 and not inter and not shift:
                                    continue  # the plain form, above
                                for gf in gfs:
                                    forms.append(
                                        ExpertForm(
                                            full,
                                            "silu",
                                            transposed,
                                            gf,
                                            True,
                                            inter,
                                            limit,
                                            alpha,
                                            shift,
                                        )
                                    )
    return forms


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _error(a, b) <= 1.0


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``a`` is from ``b``, in units of the tolerance (``<= 1``: close).

    The tolerance is relative to each element plus a floor relative to the largest element:
    in bf16/fp16 the floor is larger (0.1 of the largest, not 0.05), since a region that
    rounds its intermediates (expert outputs, weights) to 8 bits leaves errors of that order
    on the elements that cancel."""
    if a.shape != b.shape:
        return float("inf")
    fp32 = a.dtype == torch.float32 and b.dtype == torch.float32
    tol, floor = (1e-3, 0.05) if fp32 else (3e-2, 0.1)
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp_min(1e-6)
    return float(((a - b).abs() / (tol * (b.abs() + floor * scale))).max())


@dataclasses.dataclass
class _Trial:
    """One run of the expert region: inputs chosen by the verifier and what the region gave."""

    what: str
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # row i of this trial is row perm[i] of the real call


def _trials(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, E: int) -> list[_Trial]:
    """The selections a rewrite must reproduce, every row of each compared.

    Besides the call's real selection: a uniform random one; skewed ones that send every token
    to the same k experts (first and last), which is where a layer's own capacity, position-
    based dropping or expert-choice routing shows; the real selection in reversed and shuffled
    token order (an order-dependent layer shows there); and a half-overloaded selection whose
    first and last halves trade places.
    """
    T, k = ids.shape
    gen = torch.Generator().manual_seed(0)
    dev = ids.device

    def rand_w() -> torch.Tensor:
        return torch.rand(T, k, generator=gen).to(w.dtype).to(w.device) + 0.1

    def sel(rows: torch.Tensor) -> torch.Tensor:
        return rows.to(dev).to(ids.dtype)

    first = torch.arange(k).expand(T, k)
    last = torch.arange(E - k, E).expand(T, k)
    in_lo = torch.arange(T)[:, None] < T // 2  # rows [0, T//2) vs [T//2, T), for any T
    half = torch.where(in_lo, first, last)
    swapped = torch.where(in_lo, last, first)
    skew_w = rand_w()  # one set of weights for the skewed trials: their rows are compared
    out = [
        _Trial("real", x, ids, w),
        _Trial("random", x, sel(torch.rand(T, E, generator=gen).argsort(-1)[:, :k]), rand_w()),
        _Trial("first", x, sel(first), skew_w),
        _Trial("last", x, sel(last), skew_w),
        _Trial("halves", x, sel(half), skew_w),
        _Trial("halves swapped", x, sel(swapped), skew_w),
    ]
    # activations well past any clamp or saturation of the expert's gating (GPT-OSS clamps
    # at 7): forms that differ only there are told apart
    out.append(_Trial("large", x * 32, ids, w))
    for what, perm in (
        ("reversed", torch.arange(T).flip(0)),
        ("shuffled", torch.randperm(T, generator=gen)),
    ):
        p = perm.to(x.device)
        out.append(_Trial(what, x[p], ids[p.to(dev)], w[p.to(w.device)], perm=p))
    return out


def _token_dependence(trials: dict[str, _Trial]) -> str | None:
    """Where a token's output depends on the other tokens' routing, say how it showed.

    The skewed trials give each token the same (x, ids, weights) in two calls that route the
    *other* tokens differently: all tokens on the first k experts vs only one half of them
    there, and likewise for the last k. A dropless layer computes those rows identically; a
    layer with its own capacity (or position-based dropping, or expert choice) does not. The
    reversed and shuffled trials catch layers whose output depends on token order.
    """
    T = trials["real"].x.shape[0]
    lo, hi = torch.arange(T // 2), torch.arange(T // 2, T)
    pairs = [
        ("first", "halves", lo, lo),
        ("first", "halves swapped", hi, hi),
        ("last", "halves", hi, hi),
        ("last", "halves swapped", lo, lo),
    ]
    for a, b, ra, rb in pairs:
        if len(ra) and not _close(trials[b].out[rb], trials[a].out[ra]):
            return (
                "the layer enforces its own capacity: a token's output changed when only other "
                "tokens' routing changed (its own capacity, position-based dropping or expert "
                "choice); rewriting it as dropless would change what it computes"
            )
    real = trials["real"].out
    for what in ("reversed", "shuffled"):
        t = trials[what]
        # the permuted trial's row i is real row perm[i]; recover perm from x's rows
        if not _close(t.out, real[t.perm]):
            return (
                f"the layer's output depends on token order (real selection, tokens {what}): "
                "it enforces its own capacity or position-based dropping"
            )
    return None


def _identify_form(region: Region, values: dict[fx.Node, Any]) -> ExpertForm:
    """The expert form that reproduces the region on every row of every trial (``_trials``).

    Candidate forms are first screened on a few rows of the real selection (cheap), and the
    survivors are checked on every row of every trial: a layer that only misbehaves on late
    rows, on overloaded experts or in another token order cannot pass.

    In bf16/fp16 the form is decided in float32 (:func:`_upcast_trial`): the region and every
    candidate run on float32 copies of the call's tensors and parameters, so that rounding
    cannot hide the form (a layer matched in float32 is matched in bf16, with the same form).
    The chosen form is then confirmed in the real dtype (:func:`_confirm_in_dtype`).
    """
    x = values[region.x]
    if x.dtype in _LOW_FLOATS and _upcast_bytes(region, values) <= _UPCAST_LIMIT:
        sub32, values32 = _upcast_trial(region, values)
        try:
            form = _identify_in(region, values32, sub32)
        except (RuntimeError, TypeError):
            pass  # the region does not run in float32 (a dtype it insists on): as written
        else:
            return _confirm_in_dtype(region, values, values32, sub32, form)
    return _identify_in(region, values, _extract(region))


# Dtypes whose expert forms are identified in float32, and the most float32 copies of a
# layer's tensors (bytes) made for it: beyond this (a very large layer) the form is identified
# in the layer's own dtype, at that dtype's tolerance.
_LOW_FLOATS = (torch.bfloat16, torch.float16)
_UPCAST_LIMIT = 4 << 30


def _upcast(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype in _LOW_FLOATS:
        return v.float()
    return v


def _upcast_bytes(region: Region, values: dict[fx.Node, Any]) -> int:
    vs = [values[n] for n in (region.x, region.weights, *region.roots)]
    return sum(4 * v.numel() for v in vs if isinstance(v, torch.Tensor) and v.dtype in _LOW_FLOATS)


def _upcast_trial(region: Region, values: dict[fx.Node, Any]):
    """The region as a float32 program, and float32 copies of the values it reads.

    The region's code may name the low dtype (Dynamo folds ``h.to(x.dtype)`` and
    ``zeros(..., dtype=x.dtype)`` into constants): every bf16/fp16 dtype constant of the
    extracted subgraph becomes float32, so the copy computes the same thing without rounding
    to 8 (or 11) bits on the way."""
    sub = _extract(region)
    for n in sub.graph.nodes:
        n.args = fx.node.map_aggregate(n.args, _dtype_to_fp32)
        n.kwargs = fx.node.map_aggregate(n.kwargs, _dtype_to_fp32)
    sub.recompile()
    wanted = (region.x, region.ids, region.weights, *region.roots)
    return sub, {n: _upcast(values[n]) for n in wanted}


def _dtype_to_fp32(a: Any) -> Any:
    return torch.float32 if isinstance(a, torch.dtype) and a in _LOW_FLOATS else a


def _confirm_in_dtype(
    region: Region,
    values: dict[fx.Node, Any],
    values32: dict[fx.Node, Any],
    sub32: fx.GraphModule,
    form: ExpertForm,
) -> ExpertForm:
    """The form found in float32, confirmed in the real dtype on every trial, with the
    combine rounding (``ExpertForm.combine``) that reproduces the region's own more closely.

    Both the region and the form round their intermediates (the region, e.g., accumulates its
    experts' outputs in bf16; the form in float32): the form passes if it is within the
    dtype's tolerance of the region, or no farther from it than twice the region's own
    rounding (how far the region in the real dtype is from the region in float32)."""
    sub = _extract(region)
    x, ids, w = values[region.x], values[region.ids], values[region.weights]
    roots = [values[r] for r in region.roots]
    roots32 = [values32[r] for r in region.roots]
    params = [values[p] for p in region.params]
    E = region.site.num_experts
    combines = [dataclasses.replace(form, combine=c) for c in ("dtype", "float32")]
    far = dict.fromkeys(combines, 0.0)
    noise = 0.0
    with torch.no_grad():
        for t in _trials(x, ids.long(), w, E):
            got = sub(t.x, t.ids.to(ids.dtype), t.weights, *roots)
            exact = sub32(_upcast(t.x), t.ids.to(ids.dtype), _upcast(t.weights), *roots32)
            noise = max(noise, _error(exact.to(got.dtype), got))
            for f in combines:
                ref = moe_experts_reference(t.x, t.ids, t.weights, params, f)
                far[f] = max(far[f], _error(ref, got))
    form = min(combines, key=far.__getitem__)  # ties: "dtype", as the eager loop rounds
    far = far[form]
    if far > max(1.0, 2.0 * noise):
        raise Unmatched(
            f"the expert form {form.describe()} reproduces the experts in float32 but not in "
            f"{x.dtype}: {far:.3g} tolerances from the region, whose own {x.dtype} rounding "
            f"is {noise:.3g}"
        )
    return form


def _identify_in(region: Region, values: dict[fx.Node, Any], sub: fx.GraphModule) -> ExpertForm:
    """:func:`_identify_form` on the given values (the call's, or float32 copies) and
    region subgraph."""
    x, ids, w = values[region.x], values[region.ids], values[region.weights]
    roots = [values[r] for r in region.roots]
    params = [values[p] for p in region.params]
    E = region.site.num_experts
    per_expert = any(p.dim() == 0 or p.shape[0] != E for p in params)
    if per_expert:
        stacked = _stack_per_expert(params, E)
        if stacked is None:
            shared = [tuple(p.shape) for p in params if p.dim() == 0 or p.shape[0] != E]
            own = [tuple(p.shape) for p in params if p.dim() > 0 and p.shape[0] == E]
            if own and shared:
                raise Unmatched(
                    f"the experts read tensors shared by every expert (shapes {shared}) beside "
                    f"their stacked [E, ...] weights (shapes {own}): a norm or projection "
                    "applied with every expert (e.g. a norm of each expert's output), which "
                    "no expert form reproduces"
                )
            raise Unmatched(
                "expert parameters are neither stacked [E, ...] tensors nor E modules' "
                f"tensors of one shape each (shapes {[tuple(p.shape) for p in params]})"
            )
    trials = {t.what: t for t in _trials(x, ids.long(), w, E)}
    with torch.no_grad():
        for t in trials.values():
            t.out = sub(t.x, t.ids.to(ids.dtype), t.weights, *roots)
    reason = _token_dependence(trials)
    if reason:
        raise Unmatched(reason)
    real = trials["real"]
    screen = torch.arange(min(x.shape[0], 16))
    passing: list[tuple[float, ExpertForm]] = []
    gates = _gate_variants(region.expert_nodes)
    caps = _softcaps(region.expert_nodes)
    for form in _candidate_forms(stacked if per_expert else params, x.shape[1], gates, caps):
        if per_expert:  # the same roles, read off each expert's own tensors
            form = dataclasses.replace(form, stacked=False)
        try:
            if not _close(
                moe_experts_reference(x[screen], real.ids[screen], w[screen], params, form),
                real.out[screen],
            ):
                continue
            err = max(
                _error(moe_experts_reference(t.x, t.ids, t.weights, params, form), t.out)
                for t in trials.values()
            )
            if err <= 1.0:
                passing.append((err, form))
                if x.dtype == torch.float32:
                    break  # fp32 tells forms apart: the first that passes
        except RuntimeError:
            continue
    if passing:
        # in bf16 close forms (gelu / gelu-tanh) may both pass: the closest one
        return min(passing, key=lambda p: p[0])[1]
    raise Unmatched(
        "no known expert form (SwiGLU/GLU/MLP; silu/gelu/relu/relu2; clamped/interleaved "
        "GPT-OSS gating; softcapped SwiGLU) reproduces the experts"
    )


def _stack_per_expert(params: list[torch.Tensor], E: int) -> list[torch.Tensor] | None:
    """Per-expert parameters (``params`` holds E groups of n tensors, expert by expert) as n
    stacked ``[E, ...]`` tensors, for the candidate forms; None if they are not E groups of
    one shape each. A wrong grouping cannot pass: forms are checked on the tensors as given."""
    if not params or len(params) % E:
        return None
    n = len(params) // E
    groups = [params[e * n : (e + 1) * n] for e in range(E)]
    shapes = [tuple(p.shape) for p in groups[0]]
    if any([tuple(p.shape) for p in g] != shapes for g in groups):
        return None
    return [torch.stack([g[i] for g in groups]) for i in range(n)]


def _capture(gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]) -> dict[fx.Node, Any]:
    """Concrete values of ``wanted`` nodes, by interpreting the graph up to the last one."""
    got: dict[fx.Node, Any] = {}
    remaining = set(wanted)

    class _Stop(Exception):
        pass

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n in remaining:
                got[n] = r
                remaining.discard(n)
                if not remaining:
                    raise _Stop
            return r

    if remaining:
        try:
            with torch.no_grad():
                Recorder(gm).run(*_unshared(gm.graph, example_inputs))
        except _Stop:
            pass
    return got


def _mutates(node: fx.Node) -> bool:
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in _INPLACE_FUNCS:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _thread_inplace(graph: fx.Graph) -> None:
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
            and _mutates(n)
            and n.args
            and isinstance(n.args[0], fx.Node)
            and isinstance(_val(n), torch.Tensor)
        ):
            continue
        base = n.args[0]
        root = root_of.get(base, base)
        if root.op not in ("call_function", "call_method"):
            continue
        # a view of the tensor taken before this update aliases it unseen: leave it
        if any(u is not n and order[u] < order[n] and _is_alias(u) for u in root.users):
            continue
        for u in list(base.users):
            if u is not n and order[u] > order[n]:
                u.replace_input_with(base, n)
        root_of[n] = root


def _setitem_as_index_put(graph: fx.Graph) -> None:
    """``y[idx] = v`` with tensor indices only (``y[rows] += ...``, ``out[mask] = ...``: a loop
    over experts writing each expert's rows) as ``y.index_put_((idx,), v)``: the same update
    (``Tensor.__setitem__`` with tensor indices is ``index_put_``), but a method that returns
    ``y``, so :func:`_thread_inplace` can make later readers of ``y`` read it. Indices with
    slices, ints or ``None`` (writes into a view) are left as they are."""
    for n in list(graph.nodes):
        if not (n.op == "call_function" and n.target is operator.setitem and len(n.args) == 3):
            continue
        base, idx, val = n.args
        idx = idx if isinstance(idx, tuple) else (idx,)
        if (
            n.kwargs
            or n.users
            or not isinstance(base, fx.Node)
            or not isinstance(_val(base), torch.Tensor)
            or not idx
            or not all(isinstance(i, fx.Node) and isinstance(_val(i), torch.Tensor) for i in idx)
            or not (isinstance(val, fx.Node) and isinstance(_val(val), torch.Tensor))
        ):
            continue
        with graph.inserting_before(n):
            put = graph.call_method("index_put_", (base, idx, val))
        put.meta = dict(n.meta)
        put.meta["example_value"] = _val(base)
        graph.erase_node(n)


_ALIASING = {"view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze"}
_ALIASING |= {"view_as", "narrow", "select", "as_strided", "flatten", "unflatten", "chunk"}
_ALIASING |= {"split", "unbind", "diagonal", "movedim", "detach", "contiguous", "__getitem__"}


def _is_alias(node: fx.Node) -> bool:
    """Whether ``node`` may return a view of its first argument."""
    if node.op == "call_method":
        return node.target in _ALIASING
    if node.op == "call_function":
        if node.target is operator.getitem and _advanced_index(node):
            return False  # indexing with a tensor copies (``y[rows]`` before ``y[rows] += v``)
        name = getattr(node.target, "__name__", "")
        return name in _ALIASING or node.target is operator.getitem
    return False


def _advanced_index(node: fx.Node) -> bool:
    """``t[idx]`` where an index is a tensor: PyTorch's advanced indexing, which returns a copy
    whatever the other indices are."""
    if len(node.args) != 2 or not isinstance(_val(node.args[0]), torch.Tensor):
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return any(isinstance(i, fx.Node) and isinstance(_val(i), torch.Tensor) for i in idx)


def _unshared(graph: fx.Graph, example_inputs: list) -> list:
    """The inputs to interpret the graph on: clones of every input an in-place op of the graph
    may write (through any chain of ops), the others as they are.

    Interpreting the graph on the call's own tensors would apply its side effects a second
    time: a static KV cache's position counter would advance at compile time and every later
    step would write one slot off."""
    written: set[fx.Node] = set()
    for n in graph.nodes:
        if _mutates(n) and n.args and isinstance(n.args[0], fx.Node):
            written |= {a for a in _ancestors([n.args[0]]) if a.op == "placeholder"}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return [
        v.clone() if ph in written and isinstance(v, torch.Tensor) else v
        for ph, v in zip(placeholders, example_inputs, strict=False)
    ]


def rewrite_moe_layers(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | None,
) -> list[LayerReport]:
    """Rewrite every MoE layer of ``gm`` in place; return one report per router-like site.

    ``options`` are the compile's ``options=``; a layer's effective options add the global
    config and per-module overrides (``pipeline.LayerHandle``). The rewritten graph resolves
    them again each call, so configuration changes apply at once. Each verified layer is
    emitted by the first lowering that accepts it (``pipeline.lower``).
    """
    graph = gm.graph
    example_inputs, example, refused = _examples(gm, example_inputs)
    if refused:
        return [LayerReport("<graph>", False, refused)]
    _thread_inplace(graph)
    kind = _classify_constants(graph, example)
    reports, regions, left = _find_layers(graph, kind)
    progress_log.info(
        "running a graph of %d nodes once (%d MoE layer(s) found)", len(graph.nodes), len(regions)
    )
    probes = [(p, rep, site) for site, rep in left if (p := _site_probe(graph, site, kind))]
    sides = {id(r): _router_side(graph, r, kind) for r, _ in regions}
    wanted = {n for r, _ in regions for n in (r.x, r.ids, r.weights, *r.roots)}
    wanted |= {n for s in sides.values() if not isinstance(s, str) for n in s.wanted()}
    wanted |= {n for p, _, _ in probes for n in (*p.wanted(), *p.outs)}
    values = _capture(gm, example_inputs, wanted)
    values.update({n: v for n, v in example.items() if n in wanted})
    _own_capacity_of_left_sites(probes, values)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    touched: set[fx.Node] = set()  # nodes of rewritten layers that may now be dead
    for i, (region, rep) in enumerate(regions, 1):
        progress_log.info("verifying %s (%d of %d)", rep.name, i, len(regions))
        stage = "reading the values the layer computed on this call"
        try:
            # Whoever changed the parameters (expert parallelism shards them) verified the form
            # before: the layer is no longer the one to run.
            params = [values[p] for p in region.params]
            form = pipeline.known_form(params)
            if form is None:
                stage = "re-running its router on other token sets (token-wise routing)"
                side = sides[id(region)]
                T = values[region.x].shape[0]
                why = side if isinstance(side, str) else tokenwise.dependence(side, values, T)
                if why:
                    raise Unmatched(why)
                stage = "running its experts on trial selections to identify their form"
                form = _identify_form(region, values)
        except Exception as e:  # noqa: BLE001 - an analysis failure leaves the layer as written
            rep.reason = _refusal(e, stage)
            reports.append(rep)
            continue
        rep.param_inputs = [
            placeholders.index(p) if p.op == "placeholder" else None for p in region.params
        ]
        _rewrite_layer(graph, region, rep, form, params, options)
        touched.update(region.removable)
        touched.update(region.expert_nodes)
        reports.append(rep)
    routers.strip_declared(graph)
    _erase_dead(graph, touched)
    _check_no_stale_reads(graph, example)
    graph.lint()
    gm.recompile()
    return reports


def _site_probe(graph: fx.Graph, site: routers.TopKSite, kind) -> tokenwise.RouterSide | None:
    try:
        return tokenwise.site_probe(graph, site, kind)
    except Exception:  # noqa: BLE001 - only a better reason for a site left as written
        return None


def _own_capacity_of_left_sites(probes, values: dict[fx.Node, Any]) -> None:
    """A site left as written whose routing is not token-wise (Switch-Transformers' and
    NLLB-MoE's capacity masks) is reported as a layer with its own capacity: that is why it
    must stay as written, whatever else kept its layer from being found."""
    for side, rep, _ in probes:
        try:
            T = values[side.outs[0]].reshape(-1, values[side.outs[0]].shape[-1]).shape[0]
            why = tokenwise.dependence(side, values, T)
        except Exception:  # noqa: BLE001 - the site is left as written either way
            continue
        if why and "enforces its own capacity" in why:  # not "could not be re-run"
            rep.reason = why
    # one layer, several sites (NLLB-MoE's second choice is a top-1 of its own): the layer's
    # capacity is the reason for each of them
    own = {
        _module_path(site.node): rep.reason
        for _, rep, site in probes
        if "enforces its own capacity" in rep.reason and _module_path(site.node)
    }
    for _, rep, site in probes:
        rep.reason = own.get(_module_path(site.node), rep.reason)


def _examples(gm: fx.GraphModule, example_inputs: list) -> tuple[list, dict[fx.Node, Any], str]:
    """The inputs to verify on, each input and constant node's value, and why the graph
    cannot be verified ("" when it can)."""
    # Dynamo passes backed SymInts for symbolic sizes: verify on their hints (no guards).
    example_inputs = [
        getattr(v.node, "hint", None) if isinstance(v, torch.SymInt) else v for v in example_inputs
    ]
    if any(v is None for v in example_inputs):
        return example_inputs, {}, "unbacked symbolic sizes: cannot verify a rewrite"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example = dict(zip(placeholders, example_inputs, strict=False))
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            example[n] = operator.attrgetter(n.target)(gm)
    if any(isinstance(v, torch._subclasses.FakeTensor) for v in example.values()):
        return example_inputs, example, "inputs are fake tensors: cannot verify a rewrite"
    return example_inputs, example, ""


def _find_layers(graph: fx.Graph, kind: dict[fx.Node, str]) -> tuple[list, list, list]:
    """Every top-k site: the reports of sites left as written, the regions of the others, and
    the (site, report) of the sites left as written."""
    reports: list[LayerReport] = []
    regions: list[tuple[Region, LayerReport]] = []
    left: list[tuple[routers.TopKSite, LayerReport]] = []
    for site in routers.find_topk_sites(graph):
        name = _site_name(site.node)
        match = routers.match_router(site)
        if match is None:
            why = "top-k over scores no router pattern recognises" + _scores_origin(site)
            reports.append(LayerReport(name, False, why, site.num_experts, site.k))
            left.append((site, reports[-1]))
            continue
        try:
            region = _find_region(graph, match, kind)
        except Exception as e:  # noqa: BLE001 - an analysis failure leaves the layer as written
            reason = _refusal(e, "following the top-k's results to the experts and their output")
            reports.append(LayerReport(name, False, reason, site.num_experts, site.k, match.kind))
            left.append((site, reports[-1]))
            continue
        name = _layer_name(site.node, region.out)
        regions.append((region, LayerReport(name, False, "", site.num_experts, site.k, match.kind)))
    return reports, regions, left


def _rewrite_layer(
    graph: fx.Graph,
    region: Region,
    rep: LayerReport,
    form: ExpertForm,
    params: list[torch.Tensor],
    options: Mapping[str, Any] | None,
) -> None:
    """Register the verified layer, fill its report and hand it to a lowering."""
    classes = _module_classes(region.site.node) + _module_classes(region.out)
    handle = pipeline.LayerHandle(rep.name, rep.num_experts, rep.top_k, options, params, classes)
    opts = handle.options()
    rep.matched, rep.experts, rep.options = True, form.describe(), opts
    rep.form, rep.params = form, params
    rep.dispatch = _dispatch_kind(region)
    rep.tokens = _shape(region.x)[0]
    if opts["capacity_factor"] is not None and rep.tokens >= opts["min_tokens"]:
        rep.capacity = capacity(
            rep.tokens,
            rep.num_experts,
            rep.top_k,
            opts["capacity_factor"],
            opts["min_capacity"],
            opts["capacity_align"],
        )
    seq, mask, rep.padding = _sequence_tie(graph, region.x, rep.name)
    layer = pipeline.register_layer(handle)
    plan = _plan(graph, region, rep.name, form, params, layer, handle.width(opts), seq, mask)
    rep.lowering = _rewrite(graph, region, plan)


def _check_no_stale_reads(graph: fx.Graph, example: dict[fx.Node, Any]) -> None:
    """Raise if the graph still reads expert parameters someone changed after verifying them
    (``pipeline.known_form``: expert parallelism empties the weights it shards). Only a
    rewritten layer may use them; any other reader (a layer the passes left, an expert MLP
    Dynamo compiled in a graph of its own after a graph break) would compute with weights
    that are gone."""
    stale = [
        n.name
        for n in graph.nodes
        if n.op in ("placeholder", "get_attr")
        and n.users
        and isinstance(example.get(n), torch.Tensor)
        and pipeline.known_form([example[n]]) is not None
    ]
    if stale:
        raise RuntimeError(
            f"capmoe: this graph reads expert weights that were sharded or changed after "
            f"verification ({', '.join(stale)}) outside a rewritten MoE layer: the layer's "
            "router and experts must be in one graph the passes rewrite (see "
            "capmoe_compile.explain for graph breaks and the reasons layers were left)"
        )


def _scores_origin(site: routers.TopKSite) -> str:
    """What computed the scores a top-k ranked, for the reason a site is left: a router's
    scores come from a softmax or sigmoid over experts (or their logits); an attention
    indexer's or a product-key lookup's from something else, and saying which tells them
    apart."""
    n = routers._skip_value_preserving(site.scores)
    op = getattr(n.target, "__name__", str(n.target)) if n.op != "placeholder" else "an input"
    return f" (the ranked scores [.., {site.num_experts}] come from {op}, k={site.k})"


def _refusal(e: Exception, stage: str) -> str:
    """The reason a site is left as written: the passes' own, or which part of the analysis
    did not understand the layer.

    Finding and checking a layer only reads the graph, so a failure there (an op the
    verifier cannot run, a shape it did not expect) leaves the graph untouched: the layer runs
    as written and the failure is reported, not raised into the user's compile. The internal
    exception is logged at debug level (``logging.getLogger("capmoe_compile")``), not shown as
    the reason."""
    if isinstance(e, Unmatched):
        return str(e)
    log.debug("capmoe: analysis failed while %s", stage, exc_info=e)
    what = _failed_op(e)
    return (
        f"the passes did not understand this layer while {stage}"
        + (f" (at {what})" if what else "")
        + ": it runs as written"
    )


def _failed_op(e: Exception) -> str:
    """The graph node or op an analysis failure points at, if it names one."""
    arg = e.args[0] if e.args else None
    if isinstance(arg, fx.Node):  # a value the analysis expected and did not have
        return f"the tensor {arg.name}"
    tb = e.__traceback__
    node = None
    while tb is not None:  # the innermost interpreted FX node, if any
        cand = tb.tb_frame.f_locals.get("n") or tb.tb_frame.f_locals.get("node")
        if isinstance(cand, fx.Node):
            node = cand
        tb = tb.tb_next
    return (
        f"{node.name} ({node.target if node.op != 'call_function' else getattr(node.target, '__name__', node.target)})"
        if node
        else ""
    )


def _router_side(graph: fx.Graph, region: Region, kind) -> tokenwise.RouterSide | str:
    try:
        return tokenwise.router_side(
            graph,
            region.x,
            region.ids,
            region.weights,
            region.site.rows,
            region.site.num_experts,
            kind,
        )
    except Exception as e:  # noqa: BLE001 - the layer is then left as written, with this reason
        return _refusal(e, "cutting its router out of the graph (token-wise routing)")


def _erase_dead(graph: fx.Graph, touched: set[fx.Node]) -> None:
    """Erase the now unused nodes of rewritten layers, and their parameter-only inputs.

    Not ``graph.eliminate_dead_code()``: it would also delete user-less in-place ops such as
    ``inv_perm[perm] = arange`` of layers left as written, changing what they compute.
    """
    todo = set(touched)
    while todo:
        dead = [
            n
            for n in todo
            if not getattr(n, "_erased", False)
            and n.op not in ("placeholder", "output")
            and not n.users
        ]
        todo = set()
        for n in dead:
            inputs = n.all_input_nodes
            graph.erase_node(n)
            todo.update(a for a in inputs if a.op == "call_function" or a.op == "call_method")
        todo -= set(dead)


def _module_classes(node: fx.Node) -> list[type]:
    stack = node.meta.get("nn_module_stack") or {}
    return [c for _, c in stack.values() if isinstance(c, type)]


def _dispatch_kind(region: Region) -> str:
    names = {str(getattr(n.target, "__name__", n.target)) for n in region.expert_nodes}
    if any("grouped_mm" in s for s in names):
        return "grouped_mm"
    if "bmm" in names:
        return "bmm"
    if "einsum" in names:
        return "einsum"
    return "gather"


def _plan(
    graph: fx.Graph,
    region: Region,
    name: str,
    form: ExpertForm,
    params: list[torch.Tensor],
    layer: int,
    width: int,
    seq: fx.Node | None,
    mask: fx.Node | None,
) -> pipeline.LayerPlan:
    """The layer as a lowering sees it; inserts P (for ranking) and B before the output."""
    with graph.inserting_before(region.out):
        probs = region.router.probs
        if len(_shape(probs)) != 2:  # scores over [B, S, E]: the op routes rows [T, E]
            probs = graph.call_method("reshape", (probs, -1, region.site.num_experts))
        # P computed here is for ranking only: in float32, so that bf16 rounding does not make
        # ties of scores the model's logits tell apart
        if region.router.score_of_logits == "softmax":
            probs = graph.call_function(
                torch.softmax, (probs,), {"dim": -1, "dtype": torch.float32}
            )
        elif region.router.score_of_logits == "sigmoid":
            probs = graph.call_method("float", (probs,))
            probs = graph.call_function(torch.sigmoid, (probs,))
        # 0 sequences: the [B, S] structure is unknown (capacity_scope="sequence" refuses).
        num_seq = 0 if seq is None else graph.call_method("size", (seq, 0))
    return pipeline.LayerPlan(
        name=name,
        out=region.out,
        x=region.x,
        probs=probs,
        ids=region.ids,
        weights=region.weights,
        params=list(region.params),
        param_values=params,
        form=form,
        layer=layer,
        width=width,
        num_sequences=num_seq,
        mask=mask,
        x_dtype=_val(region.x).dtype,
        out_dtype=_val(region.out).dtype,
    )


def _rewrite(graph: fx.Graph, region: Region, plan: pipeline.LayerPlan) -> str:
    """Replace the layer's expert region by what a lowering emits; returns what now runs the
    experts, for ``explain``."""
    with graph.inserting_before(region.out):
        new_out, lowering = pipeline.lower(graph, plan)
    region.out.replace_all_uses_with(new_out)
    for n in reversed(region.removable):
        if not n.users:
            graph.erase_node(n)
    return lowering
