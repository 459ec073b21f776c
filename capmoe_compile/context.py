"""What Dynamo enters around every call of a model compiled with ``backend="capmoe"``.

A backend's ``backend_ctx_ctor`` is entered around tracing, guard evaluation and the compiled
code of the frames that backend compiled, and nowhere else, so these settings never reach the
user's other ``torch.compile`` calls. ``explain`` uses the same context, so it sees the graphs
the backend would compile.
"""

from __future__ import annotations

import torch.fx.experimental._config as fx_config

from . import bridge


class compile_context(bridge.capture_context):  # noqa: N801 - Dynamo calls backend_ctx_ctor()
    """What Dynamo enters around every call of a model compiled with ``backend="capmoe"``
    (tracing, guards, compiled code), and nowhere else: the graph-break bridges
    (:class:`bridge.capture_context`: the capture flags per frame, kept only where a rewrite
    takes what they captured, so a frame otherwise traces as with ``backend="inductor"``) and
    no duck sizing. Duck sizing gives two dimensions
    one symbol when they happen to be equal at the first compile (a batch of 3 prompts of 3
    tokens), and the next call where they differ recompiles: in serving, batch size and prompt
    length are independent, so capmoe's graphs keep them apart."""

    __slots__ = ("_duck",)

    def __enter__(self) -> None:
        self._duck = fx_config.use_duck_shape
        fx_config.use_duck_shape = False
        super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            fx_config.use_duck_shape = self._duck
