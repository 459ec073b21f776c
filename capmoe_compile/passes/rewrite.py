"""The rewrite of a verified layer: its report filled, its plan (``pipeline.LayerPlan``)
handed to a lowering, the region replaced by what the lowering emits, and dead nodes erased."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .. import pipeline
from ..experts import ExpertForm
from ..routing import capacity
from .fx_util import shape, val
from .padding import sequence_tie
from .region import Region
from .reports import LayerReport


def rewrite_layer(
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
    rep.tokens = shape(region.x)[0]
    if opts["capacity_factor"] is not None and rep.tokens >= opts["min_tokens"]:
        rep.capacity = capacity(
            rep.tokens,
            rep.num_experts,
            rep.top_k,
            opts["capacity_factor"],
            opts["min_capacity"],
            opts["capacity_align"],
        )
    seq, mask, rep.padding = sequence_tie(graph, region.x, rep.name)
    layer = pipeline.register_layer(handle)
    plan = _plan(graph, region, rep.name, form, params, layer, handle.width(opts), seq, mask)
    rep.lowering = _rewrite(graph, region, plan)


def erase_dead(graph: fx.Graph, touched: set[fx.Node]) -> None:
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
        if len(shape(probs)) != 2:  # scores over [B, S, E]: the op routes rows [T, E]
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
        x_dtype=val(region.x).dtype,
        out_dtype=val(region.out).dtype,
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
