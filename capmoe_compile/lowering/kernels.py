"""The experts kernels a rewritten layer may run, in one registry.

Each :class:`Kernel` answers ``supports(query) -> (ok, reason)`` from what is known when the
graph is traced (device, dtype, expert form, weight size), has a priority, and runs. The
highest-priority kernel that supports a layer runs it; :func:`choose` also says why each
other kernel was not chosen, and ``explain`` prints that per layer.

A new kernel is one :func:`register_kernel` call in the file that holds it (see
``docs/extending.md``); nothing else names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..experts import ExpertForm


@dataclasses.dataclass(frozen=True)
class KernelQuery:
    """What a kernel decides on: static properties of the layer, known at trace time."""

    device: torch.device
    dtype: torch.dtype  # the token input's
    form: ExpertForm
    weight_elements: int  # all experts, all projections
    same_dtype: bool  # every expert parameter in ``dtype``
    # reasons with figures, for ``explain`` (False while Dynamo traces the choice: sizes may
    # be symbolic there, and only the choice matters)
    explain: bool = False

    @classmethod
    def of(cls, x: torch.Tensor, params: list[torch.Tensor], form: ExpertForm) -> KernelQuery:
        return cls(
            x.device,
            x.dtype,
            form,
            sum(p.numel() for p in params),
            all(p.dtype == x.dtype for p in params),
        )


@dataclasses.dataclass(frozen=True)
class Kernel:
    """``name``: what ``explain`` prints. ``run(x, ids, weights, params, form, tile)`` computes
    ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` (sentinel ids skipped), traced
    by AOTAutograd into the graph Inductor compiles; ``opaque`` kernels are instead called as
    one op the graph does not look into (:func:`capmoe_compile.experts.moe_experts_op`)."""

    name: str
    priority: int
    supports: Callable[[KernelQuery], tuple[bool, str]]
    run: Callable[..., torch.Tensor]
    opaque: bool = False


_KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> Kernel:
    if any(k.name == kernel.name for k in _KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    _KERNELS.append(kernel)
    _KERNELS.sort(key=lambda k: -k.priority)
    return kernel


def kernels() -> tuple[Kernel, ...]:
    """The registered kernels, highest priority first."""
    return tuple(_KERNELS)


def choose(query: KernelQuery) -> tuple[Kernel, list[tuple[str, str]]]:
    """The kernel that runs a layer, and (name, why not) for each kernel tried before it."""
    passed: list[tuple[str, str]] = []
    for k in _KERNELS:
        ok, why = k.supports(query)
        if ok:
            return k, passed
        passed.append((k.name, why))
    raise RuntimeError("capmoe: no experts kernel supports this layer (the reference must)")


def describe_choice(query: KernelQuery) -> str:
    """``"traced grouped_mm (not capmoe::experts_cpu: ...; ...)"``: for ``explain``."""
    kernel, passed = choose(dataclasses.replace(query, explain=True))
    if not passed:
        return kernel.name
    return f"{kernel.name} (not {'; not '.join(f'{n}: {why}' for n, why in passed)})"
