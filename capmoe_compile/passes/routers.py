"""Router patterns: how models spell "scores over experts -> top-k".

Each pattern is a small named function that looks at one top-k site of an FX graph and says
whether it recognises it, and if so where the router probabilities ``P`` come from (SPEC.md:
the model's score function before top-k, bias, group limiting or renormalisation). They are
tried in order; the first that recognises a site names its router kind.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, "softmax"}
_SIGMOID = {torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, "sigmoid"}
_LINEAR = {F.linear, torch._C._nn.linear, torch.matmul, operator.matmul, "matmul"}
# Ops that keep the value of every element (casts, views); a router may put them anywhere.
_VALUE_PRESERVING = {"float", "to", "type", "view", "reshape", "contiguous", "type_as"}


def _is(node: fx.Node, targets: set) -> bool:
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def _shape(node) -> tuple | None:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


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


def _skip_value_preserving(node: fx.Node) -> fx.Node:
    while node.op == "call_method" and node.target in _VALUE_PRESERVING and node.args:
        node = node.args[0]
    return node


def _last_dim_softmax(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    shape = _shape(node)
    return shape is not None and dim in (-1, len(shape) - 1)


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
        shape = _shape(self.scores)
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


def _declared(node: fx.Node) -> bool:
    from ..declare import declared_router

    return node.op == "call_function" and node.target is declared_router._opoverload


def _feeds_declared(node: fx.Node, depth: int = 64) -> bool:
    seen, todo = set(), [node]
    while todo and len(seen) < depth:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _declared(n):
            return True
        todo.extend(n.users)
        if n.op == "call_method" and str(n.target).endswith("_") and n.args:
            todo.append(n.args[0])  # an in-place op feeds its target's later readers
    return False


def find_topk_sites(graph: fx.Graph) -> list[TopKSite]:
    """Every ``topk``/``max(dim)`` over the last dim of a float tensor of any rank (``[T, E]``,
    ``[B, S, E]``, ...: the rows are the leading dims flattened), with its outputs,
    and every router declared with ``@capmoe_compile.router`` (whose own top-k, if any, is
    not reported twice)."""
    sites = []
    for node in graph.nodes:
        if _declared(node):
            outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
            if 0 in outs:
                logits = node.args[0]
                E = _shape(logits)[-1]
                sites.append(TopKSite(node, outs.get(1), outs[0], node.args[3], E, logits))
            continue
        sort_site = _sort_site(node)
        if sort_site is not None:
            sites.append(sort_site)
            continue
        is_topk = _is(node, {torch.topk, "topk"})
        is_max = _is(node, {torch.max, "max"}) and (len(node.args) > 1 or "dim" in node.kwargs)
        is_argmax = _is(node, {torch.argmax, "argmax"}) and (
            len(node.args) > 1 or "dim" in node.kwargs
        )
        if not (is_topk or is_max or is_argmax):
            continue
        scores = node.args[0]
        shape = _shape(scores)
        v = scores.meta.get("example_value") if isinstance(scores, fx.Node) else None
        if shape is None or len(shape) < 2 or not v.is_floating_point():
            continue
        if is_topk:
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        else:  # max(dim) / argmax(dim): top-1
            k = 1
            dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        if not isinstance(k, int) or dim not in (-1, len(shape) - 1) or _feeds_declared(node):
            continue
        if is_argmax:  # top-1 by argmax (GShard, Switch): the indices alone, no values
            sites.append(TopKSite(node, None, node, 1, shape[-1], scores))
            continue
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if 1 not in outs:
            continue
        sites.append(TopKSite(node, outs.get(0), outs[1], k, shape[-1], scores))
    sites = _sequential_picks(sites)
    return [s for s in sites if not _limits_another(s, sites)]


def _leading_slice(node: fx.Node, rank: int) -> int | None:
    """``k`` where ``node`` is ``t[..., :k]`` (or ``t[:, :k]`` for ``rank`` 2) of its input."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not idx or not isinstance(idx[-1], slice):
        return None
    last = idx[-1]
    whole = slice(None)
    head = idx[:-1]
    if not (head == (Ellipsis,) or (len(head) == rank - 1 and all(h == whole for h in head))):
        return None
    if last.start not in (None, 0) or last.step not in (None, 1) or not isinstance(last.stop, int):
        return None
    return last.stop if last.stop > 0 else None


def _sort_site(node: fx.Node) -> TopKSite | None:
    """A top-k spelled as a descending sort over experts and a slice of the first ``k``:
    ``probs.sort(-1, descending=True)`` then ``[..., :k]`` of values and indices, or
    ``probs.argsort(-1, descending=True)[..., :k]`` (indices only, as an argmax)."""
    is_sort = _is(node, {torch.sort, "sort"})
    is_argsort = _is(node, {torch.argsort, "argsort"})
    if not (is_sort or is_argsort) or not isinstance(node.args[0], fx.Node):
        return None
    scores = node.args[0]
    shape = _shape(scores)
    v = scores.meta.get("example_value")
    if shape is None or len(shape) < 2 or v is None or not v.is_floating_point():
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
    if dim not in (-1, len(shape) - 1) or descending is not True:
        return None
    if is_argsort:
        cuts = [(u, _leading_slice(u, len(shape))) for u in node.users]
        if len(cuts) != 1 or cuts[0][1] is None:
            return None
        (ind, k), vals = cuts[0], None
    else:
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if set(outs) - {0, 1} or 1 not in outs:
            return None
        icuts = [(u, _leading_slice(u, len(shape))) for u in outs[1].users]
        vcuts = [(u, _leading_slice(u, len(shape))) for u in outs[0].users] if 0 in outs else []
        if len(icuts) != 1 or icuts[0][1] is None or len(vcuts) > 1:
            return None
        ind, k = icuts[0]
        vals = vcuts[0][0] if vcuts and vcuts[0][1] == k else None
        if vcuts and vals is None:
            return None
    if k >= shape[-1]:
        return None
    return TopKSite(node, vals, ind, k, shape[-1], scores)


_SCATTER = {torch.scatter, "scatter"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _excludes(later: TopKSite, first: TopKSite) -> bool:
    """``later`` ranks ``first``'s scores with ``first``'s pick set to -inf:
    ``scatter(scores, -1, first_index, -inf)`` (casts and views aside)."""
    src = _skip_value_preserving(later.scores)
    if not _is(src, _SCATTER) or src.kwargs:
        return False
    if len(src.args) != 4:
        return False
    inp, dim, index, value = src.args
    shape = _shape(first.scores)
    return (
        isinstance(inp, fx.Node)
        and isinstance(index, fx.Node)
        and _skip_value_preserving(inp) is _skip_value_preserving(first.scores)
        and _skip_value_preserving(index) is first.indices
        and dim in (-1, len(shape) - 1)
        and value == float("-inf")
        and same_shape(_shape(first.indices), (*shape[:-1], 1))
    )


def _sequential_picks(sites: list[TopKSite]) -> list[TopKSite]:
    """Two top-1 sites that are one top-2 (PhiMoE's sparsemixer): the second max runs over
    the first's scores with the first's pick scattered to -inf, and the two picks' indices
    ([.., 1] each) are concatenated along the last dim, first pick first: the same selection
    as a top-2 over the first's scores. Reported as one site of k=2 over those scores, whose
    indices are the concatenation; each pick's values stay in the region (the router's own
    tail computes W from them)."""
    out = list(sites)
    for first in sites:
        for later in sites:
            if first.k != 1 or later.k != 1 or later is first or first not in out:
                continue
            if later not in out or not _excludes(later, first):
                continue
            cat = next(
                (
                    u
                    for u in first.indices.users
                    if _is(u, _CAT)
                    and len(u.args) >= 1
                    and list(u.args[0]) == [first.indices, later.indices]
                    and (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0))
                    in (-1, len(_shape(first.scores)) - 1)
                ),
                None,
            )
            if cat is None:
                continue
            out.remove(first)
            out.remove(later)
            out.append(
                TopKSite(
                    first.node,
                    None,
                    cat,
                    2,
                    first.num_experts,
                    first.scores,
                    picks=(first.node, later.node),
                )
            )
    return out


def _limits_another(site: TopKSite, sites: list[TopKSite]) -> bool:
    """A top-k over fewer "experts" whose result shapes the scores of another top-k of the same
    module (group-limited routing picks groups first, DeepSeek-V3 style) is a stage of that
    router, not a router of its own."""
    path = _stack_path(site.node)
    later = {
        s.scores
        for s in sites
        if s is not site and s.num_experts > site.num_experts and _stack_path(s.node) == path
    }
    if not later:
        return False
    seen, todo = set(), [site.node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in later:
            return True
        todo.extend(n.users)
        if n.op == "call_method" and str(n.target).endswith("_") and n.args:
            todo.append(n.args[0])  # an in-place op feeds its target's later readers
    return False


def _stack_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def softmax_topk(site: TopKSite) -> RouterMatch | None:
    """softmax over experts -> top-k (Mixtral, Qwen-MoE, OLMoE; renormalised or not)."""
    src = _skip_value_preserving(site.scores)
    if _is(src, _SOFTMAX) and _last_dim_softmax(src):
        return RouterMatch("softmax_topk", site, src)
    return None


def softmax_top1(site: TopKSite) -> RouterMatch | None:
    """softmax -> max/top-1 (Switch Transformer style)."""
    if site.k != 1:
        return None
    m = softmax_topk(site)
    return dataclasses.replace(m, kind="softmax_top1") if m else None


def softmax_bias_topk(site: TopKSite) -> RouterMatch | None:
    """softmax over experts, then a selection bias or mask, then top-k (Ernie-4.5's
    ``e_score_correction_bias`` on the softmax output).

    P is the softmax output: SPEC.md's P is the score function before any selection bias;
    the bias only shapes the model's selection S (the weights are gathered from P or from
    the biased scores, whichever the model reads: W is found in the region, not assumed)."""
    n = _upstream(site, _SOFTMAX)
    if n is not None and _last_dim_softmax(n):
        return RouterMatch("softmax_bias_topk", site, n)
    return None


def sigmoid_bias_grouped_topk(site: TopKSite) -> RouterMatch | None:
    """sigmoid scores (+ selection bias, group-limited masking) -> top-k (DeepSeek-V3 style).

    P is the sigmoid output; the bias and group masking only shape the model's selection S.
    """
    n = _upstream(site, _SIGMOID)
    return RouterMatch("sigmoid_bias_grouped_topk", site, n) if n is not None else None


def _upstream(site: TopKSite, targets: set, depth: int = 12) -> fx.Node | None:
    """The nearest node calling one of ``targets`` among the scores' ancestors of the scores'
    own shape (what a bias, mask or scaling between it and the top-k keeps), or None."""
    shape = _shape(site.scores)
    seen, frontier = set(), [site.scores]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if _is(n, targets) and same_shape(_shape(n), shape):
                return n
            nxt.extend(a for a in n.all_input_nodes if same_shape(_shape(a), shape))
        frontier = nxt
    return None


def logits_topk_softmax(site: TopKSite) -> RouterMatch | None:
    """top-k over raw logits, softmax over the selected (GPT-OSS, Granite style); also over
    logits scaled by a positive constant (a temperature: ``gate(x) / tau``), where P is the
    softmax of the scaled logits over all experts (SPEC.md, generic router)."""
    src = _skip_value_preserving(site.scores)
    if site.values is None or not any(_is(u, _SOFTMAX) for u in site.values.users):
        return None
    if _is(src, _LINEAR):
        return RouterMatch("logits_topk_softmax", site, src, score_of_logits="softmax")
    if _temperature_scaled(src):
        return RouterMatch("scaled_logits_topk_softmax", site, src, score_of_logits="softmax")
    return None


_SCALE = {operator.truediv, operator.mul, torch.div, torch.mul, "div", "mul", "__truediv__"}
_SCALE |= {"__mul__", "__rmul__"}


def _temperature_scaled(node: fx.Node) -> bool:
    """``linear(...) / c`` or ``linear(...) * c`` (either order for ``*``) with ``c`` a positive
    Python number: logits under a temperature."""
    if not _is(node, _SCALE) or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    div = getattr(node.target, "__name__", node.target) in ("truediv", "div", "__truediv__")
    pairs = [(a, b)] if div else [(a, b), (b, a)]
    for t, c in pairs:
        if (
            isinstance(t, fx.Node)
            and isinstance(c, (int, float))
            and not isinstance(c, bool)
            and c > 0
            and _is(_skip_value_preserving(t), _LINEAR)
        ):
            return True
    return False


_ADD = {operator.add, torch.add, "add", "__add__"}


def _token_independent(node: fx.Node) -> bool:
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


def scores_bias_topk(site: TopKSite) -> RouterMatch | None:
    """top-k over scores plus a token-independent selection bias (Kolibri-1: raw logits + bias,
    sigmoid of the selected; DeepSeek-V4: another score function + bias). SPEC's generic rule,
    with the bias identified and excluded: P is the scores the bias is added to, or their
    softmax over all experts where they are raw logits (``linear`` output)."""
    src = _skip_value_preserving(site.scores)
    if not _is(src, _ADD) or len(src.args) != 2:
        return None
    a, b = src.args
    shape = _shape(site.scores)
    for x, bias in ((a, b), (b, a)):
        if not isinstance(x, fx.Node) or not isinstance(bias, fx.Node):
            continue
        bshape = _shape(bias)
        if not same_shape(_shape(x), shape) or bshape is None:
            continue
        n = 1
        for d in bshape:
            n = n * d
        if not known_equal(n, site.num_experts) or not _token_independent(bias):
            continue
        inner = _skip_value_preserving(x)
        if _is(inner, _LINEAR):
            return RouterMatch("logits_bias_topk", site, x, score_of_logits="softmax")
        return RouterMatch("scores_bias_topk", site, x)
    return None


def sequential_top1(site: TopKSite) -> RouterMatch | None:
    """Top-2 as two top-1 picks over raw router logits (PhiMoE's sparsemixer at inference: the
    max, then the max with the first pick excluded; each weight a softmax over the logits
    near its pick). SPEC's generic rule: both picks rank the raw logits (the second among the
    experts left), so P = softmax of the logits over all experts, for ranking only; the
    weights W are the model's own."""
    if not site.picks:
        return None
    src = _skip_value_preserving(site.scores)
    if _is(src, _LINEAR):
        return RouterMatch("sequential_top1_logits", site, src, score_of_logits="softmax")
    return None


def declared(site: TopKSite) -> RouterMatch | None:
    """A routing function decorated with ``@capmoe_compile.router(top_k=k, score=...)``."""
    if _declared(site.node):
        return RouterMatch("declared", site, site.scores, score_of_logits=site.node.args[4])
    return None


ROUTER_PATTERNS: list[Callable[[TopKSite], RouterMatch | None]] = [
    declared,
    softmax_top1,
    softmax_topk,
    softmax_bias_topk,
    sigmoid_bias_grouped_topk,
    logits_topk_softmax,
    scores_bias_topk,
    sequential_top1,
]


def match_router(site: TopKSite) -> RouterMatch | None:
    if site.picks:  # a top-2 of sequential picks: only the pattern that knows it says what P is
        return sequential_top1(site)
    for pattern in ROUTER_PATTERNS:
        m = pattern(site)
        if m is not None:
            return m
    return None


def strip_declared(graph: fx.Graph) -> None:
    """Remove the ``declared_router`` markers: their outputs are their inputs."""
    for node in list(graph.nodes):
        if _declared(node):
            for u in list(node.users):
                u.replace_all_uses_with(node.args[2 if u.args[1] == 1 else 1])
                graph.erase_node(u)
            graph.erase_node(node)
