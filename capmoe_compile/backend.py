"""The ``capmoe`` Dynamo backend: ``torch.compile(model, backend="capmoe", options={...})``.

It receives Dynamo's FX graph, runs the passes (``capmoe_compile.passes``: find every MoE
layer, verify it, rewrite it into capacity-aware dispatch) and hands the result to Inductor's
``compile_fx``. Graphs without MoE layers compile exactly as with ``backend="inductor"``.

Options are validated when the first call compiles (torch.compile gives a backend no earlier
hook): a bad one raises :class:`OptionError`, a ``ValueError`` naming it, itself and not wrapped
in Dynamo's ``BackendCompilerFailed``. They are not
baked into the compiled code: each rewritten layer resolves its options when it runs (global
config < ``options=`` < per-module overrides; see ``capmoe_compile.ops.route_layer``), so
``config.patch``, ``configure`` and ``record_stats`` take effect on the next call with no
recompile, and a compiled graph can never act on stale options.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import bridge, config
from .bridge import check_capture_used
from .context import compile_context

#: what a compile is doing now (``capmoe_compile.tools.progress`` shows it on a terminal)
progress_log = logging.getLogger("capmoe_compile.progress")

_compile_count = 0


def compile_count() -> int:
    """How many graphs this backend has compiled, for tests."""
    return _compile_count


def capmoe_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo backend (entry point ``capmoe``): capacity-aware MoE inference (SPEC.md).

    ``options`` are ``capmoe_compile.config`` knobs that override the global values for this
    compile. ``mode`` is ``torch.compile``'s, applied to Inductor as ``backend="inductor"``
    applies it.
    """
    global _compile_count
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from .explain import installed
    from .passes import run_passes

    options = dict(options or {})
    try:
        config.resolve(options)  # validate before any work
    except ValueError as e:
        raise OptionError(str(e), inspect.currentframe()) from None
    reports = run_passes(gm, example_inputs, options)
    # a frame traced with the capture flags whose data-dependent values no rewrite took is traced
    # again without them, as Inductor traces it: raise before Inductor's compile, not after
    check_capture_used(gm)
    progress_log.info(
        "Inductor compiling a graph (%d MoE layer(s) rewritten)", sum(r.matched for r in reports)
    )
    patch = dict(list_mode_options(mode)) if mode else {}
    if _rounds_as_eager(gm):
        patch["emulate_precision_casts"] = True
    with torch._inductor.config.patch(patch):
        compiled = compile_fx(gm, list(example_inputs))
    _compile_count += 1
    return installed(compiled, reports)


def _rounds_as_eager(gm: torch.fx.GraphModule) -> bool:
    """Whether Inductor compiles ``gm`` rounding every bf16/fp16 op's result as eager does
    (``emulate_precision_casts``): for a frame traced with the capture flags (kept because a
    rewrite took what they captured) that computes in a low-precision float.

    Without the flags Inductor would have broken that frame at its data-dependent ops (or
    skipped it: a loop over experts that breaks is run eagerly), so the code around the MoE
    layer (the router's softmax, its gathered and renormalised weights) ran as eager runs it.
    Traced whole, Inductor fuses it and keeps the intermediates in float32: in bf16 a gate
    weight ``w / w.sum()`` then differs from eager's by one rounding, and the layer's output
    by 0.03 where ``backend="inductor"`` (eager) differs by 0 (issue 23, ``hand_argsort_probs``
    of ``benchmarks/external_layers.py``). Rounding as eager does keeps capacity off as
    faithful as Inductor."""
    if not bridge._trial:
        return False
    from .passes.fx_util import meta_value

    low = (torch.bfloat16, torch.float16)
    for n in gm.graph.nodes:
        v = meta_value(n)
        if isinstance(v, torch.Tensor) and v.dtype in low:
            return True
    return False


# Dynamo enters a backend's ``backend_ctx_ctor`` around every call of what it compiled (tracing,
# guards, compiled code): the bridges and shape settings of ``context.py``, for capmoe only.
capmoe_backend.backend_ctx_ctor = compile_context  # type: ignore[attr-defined]


class OptionError(ValueError, torch._dynamo.exc.ShortenTraceback):
    """A bad ``options=`` value. A ``ValueError`` that Dynamo lets through unwrapped (it
    re-raises ``ShortenTraceback`` as is), so the user sees the message first and not a
    ``BackendCompilerFailed`` around it."""

    def __init__(self, message: str, frame: types.FrameType | None = None) -> None:
        ValueError.__init__(self, message)
        self.message = message
        self.first_useful_frame = frame  # Dynamo cuts the traceback's frames before this one

    def __str__(self) -> str:
        # Dynamo's ``augment_exc_message`` appends "Set TORCHDYNAMO_VERBOSE=1 ... reporting a bug
        # to PyTorch" to ``args[0]`` of every exception escaping a frame it traced; a bad option
        # is the user's to fix, not a PyTorch bug, so the message is the one raised
        return self.message
