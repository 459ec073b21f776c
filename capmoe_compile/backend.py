"""The ``capmoe`` Dynamo backend: ``torch.compile(model, backend="capmoe", options={...})``.

It receives Dynamo's FX graph, runs the passes (``capmoe_compile.passes``: find every MoE
layer, verify it, rewrite it into capacity-aware dispatch) and hands the result to Inductor's
``compile_fx``. Graphs without MoE layers compile exactly as with ``backend="inductor"``.

Options are validated at compile time: a bad one raises ``ValueError`` naming it. They are not
baked into the compiled code: each rewritten layer resolves its options when it runs (global
config < ``options=`` < per-module overrides; see ``capmoe_compile.ops.route_layer``), so
``config.patch``, ``configure`` and ``record_stats`` take effect on the next call with no
recompile, and a compiled graph can never act on stale options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import config

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

    from .passes import run_passes

    options = dict(options or {})
    config.resolve(options)  # validate before any work
    run_passes(gm, example_inputs, options)
    with torch._inductor.config.patch(list_mode_options(mode) if mode else {}):
        compiled = compile_fx(gm, list(example_inputs))
    _compile_count += 1
    return compiled
