"""Single-device lowering of a rewritten MoE layer: route, then dispatch + experts + combine.

:func:`lower_single_device` is registered with ``pipeline`` as the fallback lowering: it
accepts every verified layer. It emits ``capmoe::route_layer`` (the capacity policy with the
options in force at each call) and then the experts stage: ``grouped.moe_experts_grouped``
(which picks the CPU op, the Triton kernels or the traced grouped-GEMM path) where the form
and dtypes allow it, else the eager reference op.
"""

from __future__ import annotations

import operator

from torch import fx

from .. import experts, ops, pipeline
from . import epilogue, grouped, kernels  # noqa: F401 - epilogue registers its kernel


def lower_single_device(graph: fx.Graph, plan: pipeline.LayerPlan) -> tuple[fx.Node, str]:
    routed = graph.call_function(
        ops.route_layer._opoverload,
        (
            plan.probs,
            plan.ids,
            plan.weights,
            plan.layer,
            plan.width,
            plan.num_sequences,
            plan.mask,
            plan.params[0],
        ),
    )
    ids = graph.call_function(operator.getitem, (routed, 0))
    w = graph.call_function(operator.getitem, (routed, 1))
    tile = graph.call_function(operator.getitem, (routed, 2))  # batch-invariant GEMMs
    x_val = plan.x.meta.get("example_value")
    dtype = plan.x_dtype
    query = kernels.KernelQuery.of(x_val, plan.param_values, plan.form)
    kernel, _ = kernels.choose(query)
    what = kernels.describe_choice(query)
    if kernel.opaque:
        fast = experts.moe_experts_op._opoverload  # the eager reference, opaque
    else:
        fast = grouped.moe_experts_grouped  # traced by AOTAutograd: Inductor fuses it
    args = (plan.x, ids, w, list(plan.params), plan.form.to_str(), tile)
    out = graph.call_function(fast, args)
    if plan.out_dtype != dtype:
        out = graph.call_method("to", (out, plan.out_dtype))
    return out, what


pipeline.register_lowering("single device", lower_single_device, fallback=True)
