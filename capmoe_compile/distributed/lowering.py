"""The expert-parallel lowering: a sharded layer's experts become dispatch, the rank's
experts and combine over the group (registered with ``pipeline``, tried before the
single-device lowering).

It accepts a layer whose expert parameters ``expert_parallel`` sharded (``ep.py``), and emits
the static functional-collective form (``functional.py``) where it applies, else the opaque
``capmoe::ep_moe`` op. The rank's own experts enter the graph as buffers of the graph module
(the model's parameters no longer hold them). Choosing the static form is a collective:
every rank compiles the same graph at the same call.
"""

from __future__ import annotations

from torch import fx

from .. import pipeline
from . import functional
from . import group as grp
from .ep import ep_moe_op, sharded_form


def lower_expert_parallel(graph: fx.Graph, plan: pipeline.LayerPlan) -> tuple[fx.Node, str] | None:
    key = getattr(plan.param_values[0], "_capmoe_ep_key", None)
    if key is None:
        return None
    ep = grp.get(key)
    local = _local_params(graph, key, ep)
    opts = pipeline.layer(plan.layer).options()
    why = _why_opaque(plan, ep, opts)
    if not why:
        T, k = _rows(plan)
        got = functional.make_plan(plan.layer, key, T, k, opts, ep.form.to_str())
        if isinstance(got, str):
            why = got
        else:
            ep.compiled_as = "static"
            pid = len(functional._PLANS) - 1
            args = (plan.x, plan.probs, plan.ids, plan.weights, local, pid)
            return graph.call_function(functional.ep_moe_static, args), "expert parallel, static"
    ep.compiled_as = f"opaque: {why}"
    args = (plan.x, plan.probs, plan.ids, plan.weights, plan.layer, key, plan.num_sequences)
    node = graph.call_function(ep_moe_op._opoverload, (*args, plan.mask))
    return node, f"expert parallel, {ep.compiled_as}"


def _rows(plan: pipeline.LayerPlan) -> tuple[int, int]:
    x, ids = plan.x.meta.get("example_value"), plan.ids.meta.get("example_value")
    return int(x.shape[0]), int(ids.shape[1])


def _why_opaque(plan: pipeline.LayerPlan, ep: grp.EPLayer, opts: dict) -> str:
    """Why the layer keeps the opaque op ("" when the static form applies)."""
    if ep.dispatch == "opaque":
        return "dispatch='opaque'"
    if ep.placement is not None:
        return "redundant copies (a placement) run through the opaque op"
    if plan.x.meta.get("example_value") is None or plan.ids.meta.get("example_value") is None:
        return "no example shapes"
    mask_used = plan.mask is not None and opts["exclude_padding"]
    return functional.why_not_static(opts, mask_used, plan.x_dtype, ep.form)


def _local_params(graph: fx.Graph, key: int, ep: grp.EPLayer) -> list[fx.Node]:
    """This rank's expert weights as buffers of the graph module, read by ``get_attr``."""
    gm = graph.owning_module
    nodes = []
    for i, t in enumerate(ep.local):
        name = f"_capmoe_ep{key}_{i}"
        if not hasattr(gm, name):
            gm.register_buffer(name, t, persistent=False)
            # AOTAutograd asks Dynamo's graph module where each of its buffers came from
            sources = getattr(gm, "_param_name_to_source", None)
            if sources is not None:
                from torch._dynamo.source import ConstantSource  # compiling: Dynamo is loaded

                sources[name] = ConstantSource(f"capmoe_ep_layer_{key}_weight_{i}")
        nodes.append(graph.get_attr(name))
    return nodes


pipeline.register_lowering("expert parallel", lower_expert_parallel)
pipeline.register_form_source(sharded_form)
