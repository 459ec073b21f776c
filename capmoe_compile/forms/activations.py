"""The elementwise activations expert forms apply, in one table.

An activation is a name (what ``ExpertForm.act`` holds and what a kernel is asked about), the
function, and optionally an in-place version (the CPU op computes into its own scratch).
A kernel that implements activations itself (the Triton kernels) keeps its own list of the
names it covers and declines forms whose activation is not on it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor], torch.Tensor]

#: name -> function (out of place)
ACTIVATIONS: dict[str, Fn] = {}
_INPLACE: dict[str, Fn] = {}


def register_activation(name: str, fn: Fn, inplace: Fn | None = None) -> None:
    """Add an activation every gated or plain form family may propose (in registration
    order). ``inplace(g)`` computes ``fn(g)`` into ``g`` and returns it."""
    if name in ACTIVATIONS:
        raise ValueError(f"an activation named {name!r} is already registered")
    ACTIVATIONS[name] = fn
    if inplace is not None:
        _INPLACE[name] = inplace


def apply_inplace(name: str, g: torch.Tensor) -> torch.Tensor:
    """``ACTIVATIONS[name](g)``, in place where the activation has an in-place version."""
    fn = _INPLACE.get(name)
    return fn(g) if fn is not None else ACTIVATIONS[name](g)


register_activation("silu", F.silu, lambda g: F.silu(g, inplace=True))
register_activation("gelu", F.gelu, lambda g: torch.ops.aten.gelu_(g))
register_activation(
    "gelu_tanh",
    lambda x: F.gelu(x, approximate="tanh"),
    lambda g: torch.ops.aten.gelu_(g, approximate="tanh"),
)
register_activation("relu", F.relu, lambda g: g.relu_())
# squared ReLU (Primer, Nemotron-H)
register_activation("relu2", lambda x: torch.square(F.relu(x)))
