"""The stages of a rewritten MoE layer, and the registries that join them.

A rewritten layer runs four stages: **route** (the capacity policy on the router's selection,
``routing.py`` and the ``capmoe::route_layer`` op in ``ops.py``), **dispatch** (rows to
experts), **experts** (one definition of each expert form, ``experts.py``) and **combine**.
Who runs dispatch, experts and combine depends on where the layer lives: one device
(``lowering/``: a sorted grouped GEMM path, a CPU op, Triton kernels) or a group of ranks
(``distributed/``: all-to-all dispatch and combine around the same expert stage).

This module is the interface between them, and imports none of them:

- the passes (``passes/``) find and verify a layer and describe it as a :class:`LayerPlan`;
- a lowering turns a plan into graph nodes. Lowerings register themselves
  (:func:`register_lowering`); the first one that accepts a plan emits it. The single-device
  lowering accepts every plan; the expert-parallel one accepts the layers it sharded.
- Sharded layers can no longer be verified by running them (their weights are gone), so
  whoever sharded them says what their form was when it verified them
  (:func:`register_form_source`, :func:`known_form`).
- :class:`LayerHandle` and :func:`register_layer`: the run-time record of a rewritten layer
  (its name, shape and options), which the route op and the EP ops read when they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from . import config
from .experts import ExpertForm
from .routing import output_width


@dataclasses.dataclass
class LayerPlan:
    """A verified MoE layer, as the passes hand it to a lowering.

    The nodes belong to the graph being rewritten; a lowering inserts its nodes before
    ``out`` and returns the node that replaces it."""

    name: str
    out: fx.Node  # the layer's output in the graph: what the lowering replaces
    x: fx.Node  # the rows the experts read, [T, H]
    probs: fx.Node  # P (SPEC.md) as float32 [T, E], for ranking
    ids: fx.Node  # the router's selection S, [T, k]
    weights: fx.Node  # its gate weights W, [T, k]
    params: list[fx.Node]  # the expert parameters, in ``form.roles`` order
    param_values: list[torch.Tensor]  # their values while compiling
    form: ExpertForm
    layer: int  # index of the layer's LayerHandle
    width: int  # columns of the routed selection (k, or k' of expanded_drop)
    num_sequences: fx.Node | int  # B of the [B, S] rows (0: unknown)
    mask: fx.Node | None  # the attention mask tied to the rows, if any
    x_dtype: torch.dtype
    out_dtype: torch.dtype


#: ``lower(graph, plan) -> (replacement node, what runs the experts) | None`` (None: not mine).
Lowering = Callable[[fx.Graph, LayerPlan], "tuple[fx.Node, str] | None"]

_LOWERINGS: list[tuple[str, Lowering]] = []
_FORM_SOURCES: list[Callable[[list[torch.Tensor]], ExpertForm | None]] = []


def register_lowering(name: str, lower: Lowering, *, fallback: bool = False) -> None:
    """Add a lowering. ``fallback``: tried after every other one (the single-device path)."""
    if any(n == name for n, _ in _LOWERINGS):
        return
    if fallback:
        _LOWERINGS.append((name, lower))
    else:
        _LOWERINGS.insert(0, (name, lower))


def lower(graph: fx.Graph, plan: LayerPlan) -> tuple[fx.Node, str]:
    """Emit ``plan`` with the first lowering that accepts it, and guard its width (see
    :func:`guard_width`)."""
    for _, fn in _LOWERINGS:
        got = fn(graph, plan)
        if got is not None:
            guard_width(plan)
            return got
    raise RuntimeError(
        "capmoe: no lowering is registered (import capmoe_compile, which registers them)"
    )


def register_form_source(source: Callable[[list[torch.Tensor]], ExpertForm | None]) -> None:
    """``source(params)`` returns the verified form of parameters it knows, else None."""
    if source not in _FORM_SOURCES:
        _FORM_SOURCES.append(source)


def known_form(params: list[torch.Tensor]) -> ExpertForm | None:
    """The form recorded for these expert parameters by whoever changed them (e.g. sharded
    them), or None: the passes then verify the layer by running it."""
    for source in _FORM_SOURCES:
        form = source(params)
        if form is not None:
            return form
    return None


class LayerHandle:
    """What the ops of a rewritten layer need to know about it when they run.

    Options are not baked into the graph: :meth:`options` resolves them when called (global
    config < ``options=`` < per-module overrides), cached per configuration version, so a
    configuration change applies on the next call."""

    def __init__(self, name, num_experts, top_k, options, params, classes):
        self.name = name
        self.num_experts = num_experts
        self.top_k = top_k
        self.compile_options = dict(options or {})
        self.params = params  # the layer's expert weights (the compiled graph holds them too)
        self.classes = classes
        self._cache: tuple[Any, dict] | None = None
        self._width: tuple[tuple[int, int], int] | None = None

    def options(self, anchor: torch.Tensor | None = None) -> dict:
        """The options in force now. ``anchor`` is the layer's first expert weight as the
        running graph sees it: two instances of one model class share a compiled graph, and
        per-instance overrides must follow the instance actually running."""
        from . import module_config

        params = self.params if anchor is None else [anchor]
        key = (config.version(), params[0].data_ptr())
        if self._cache is None or self._cache[0] != key:
            opts = module_config.resolve_layer(self.compile_options, params, self.classes)
            self._cache = (key, opts)
            warn_outranked(self.compile_options)
        return self._cache[1]

    def width(self, opts: dict) -> int:
        """Columns of the routed selection under ``opts``: k, or k' of ``expanded_drop``."""
        if opts["capacity_factor"] is None:
            return self.top_k
        return output_width(self.top_k, self.num_experts, opts["policy"], opts["local_experts"])

    def width_now(self, anchor: torch.Tensor | None = None) -> int:
        """:meth:`width` under the options in force now, cached per configuration version and
        weight (the guard of :func:`guard_width` calls this on every call of the frame)."""
        key = (config._version, (self.params[0] if anchor is None else anchor).data_ptr())
        cached = self._width
        if cached is None or cached[0] != key:
            cached = self._width = (key, self.width(self.options(anchor)))
        return cached[1]


_WARNED_OUTRANKED: set[tuple[str, str, str]] = set()


def warn_outranked(compile_options: dict) -> None:
    """Warn, once per knob and pair of values, where ``options=`` outranks a value someone set
    in ``capmoe_compile.config`` (``config.patch`` or an assignment): that value does nothing
    for this compiled model, which is easy to miss."""
    import warnings

    from . import config

    for name, value in compile_options.items():
        if name not in config.KNOBS:
            continue
        value, now = config.validate(name, value), getattr(config, name)
        if now == config.KNOBS[name] or now == value:
            continue
        key = (name, repr(now), repr(value))
        if key in _WARNED_OUTRANKED:
            continue
        _WARNED_OUTRANKED.add(key)
        warnings.warn(
            f"capmoe: torch.compile(..., options={{{name!r}: {value!r}}}) outranks "
            f"capmoe_compile.config {name}={now!r} (set by config.patch or an assignment), so "
            f"{name}={value!r} applies to this compiled model. Precedence: config < options= < "
            f"configure(class) < configure(instance); leave {name!r} out of options= to let "
            "config decide",
            stacklevel=3,
        )


_LAYERS: list[LayerHandle] = []


def register_layer(handle: LayerHandle) -> int:
    _LAYERS.append(handle)
    return len(_LAYERS) - 1


def layer(index: int) -> LayerHandle:
    return _LAYERS[index]


# ---------------------------------------------------------------------------------------------
# The one structural option: the routed selection's width.
#
# Every option is resolved when a layer runs, except the width of its routed selection: k, or
# k' > k under ``expanded_drop`` (tokens get more than k experts), which fixes the shapes of the
# graph after the route. So a rewritten layer's width is guarded: while Dynamo traces the frame
# (the backend runs inside its trace), :func:`guard_width` adds a guard "this layer's width
# under the options in force now is still ``plan.width``" to the frame's guards. A call after a
# change of width (``config.patch(policy="expanded_drop")``, ``configure``, ``exempt``, ...)
# fails that guard, and Dynamo recompiles the frame for the new width, or reuses the entry it
# compiled for that width before: switching back and forth compiles each width once. Every
# other option change leaves the guard passing (no recompile).
#
# The guard sits on the layer's first expert weight as the frame passes it (its ``anchor``, the
# tensor ``capmoe::route_layer`` resolves per-instance overrides with), so two instances of one
# class that share a compiled frame are each checked with their own overrides. Its cost per
# call is one Python call per layer that compares the configuration version and the weight's
# data pointer with the last ones it saw.


def guard_width(plan: LayerPlan) -> bool:
    """Add the width guard of ``plan`` to the frame Dynamo is tracing; False (nothing added)
    outside a Dynamo trace (e.g. passes run on a graph by hand): such a graph has no guards,
    and ``capmoe::route_layer`` then raises if its width no longer fits."""
    from torch._guards import Guard, TracingContext

    if TracingContext.try_get() is None:
        return False
    from torch._dynamo.guards import install_guard
    from torch._dynamo.source import GlobalStateSource

    handle, width = layer(plan.layer), plan.width
    grapharg = plan.params[0].meta.get("grapharg") if plan.params else None
    source = getattr(grapharg, "source", None)
    what = f"capmoe width of {handle.name} == {width}"

    if source is not None:  # checked with the weight the running frame passes

        def check(anchor: Any) -> bool:
            return handle.width_now(anchor) == width

    else:  # the weights are graph constants: the graph belongs to one instance

        def check(anchor: Any) -> bool:
            return handle.width_now() == width

    def create(builder: Any, guard: Guard) -> None:
        from torch._dynamo.guards import get_verbose_code_parts

        manager = builder.guard_manager.root if source is None else builder.get_guard_manager(guard)
        manager.add_lambda_guard(check, get_verbose_code_parts(what, guard), guard.user_stack)

    create.__name__ = "CAPMOE_WIDTH_MATCH"  # how Dynamo's logs name the guard
    install_guard(Guard(source if source is not None else GlobalStateSource(), create))
    return True
