"""How capmoe defines its custom ops: ``torch.library.custom_op``'s interface, a cheaper call.

An op made by ``torch.library.custom_op`` crosses into Python twice per call (its autograd
wrapper, then the kernel) and costs ~35-40 us over calling the function itself on this
project's CPUs; a compiled decode step calls the route op once per MoE layer, so on small
models that is a visible share of the step. :func:`custom_op` here defines the same schema
(inferred from the type hints, as ``custom_op`` does) in a ``torch.library.Library`` fragment
with the function as its ``CompositeExplicitAutograd`` kernel: one Python call, ~6 us over the
function. What callers use is the same: call the op, ``op.register_fake``, ``op._opoverload``.

The kernels must not return their inputs (or views of them): Inductor and functionalization
assume a pure op's outputs are new tensors, as ``custom_op`` enforces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_LIBS: dict[str, torch.library.Library] = {}


class CustomOp:
    """One op: callable like its function, through the dispatcher."""

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        namespace, name = qualname.split("::")
        lib = _LIBS.get(namespace)
        if lib is None:
            lib = _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
        lib.define(name + torch.library.infer_schema(fn, mutates_args=()))
        lib.impl(name, fn, "CompositeExplicitAutograd")
        self._lib = lib
        self._qualname = qualname
        self._opoverload = getattr(getattr(torch.ops, namespace), name).default
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._opoverload(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The shape-only kernel tracing uses (a decorator, as ``custom_op``'s)."""
        torch.library.register_fake(self._qualname, fn, lib=self._lib)
        return fn


def custom_op(qualname: str) -> Callable[[Callable[..., Any]], CustomOp]:
    """``@custom_op("capmoe::name")`` on a pure function with type hints: defines the op."""
    return functools.partial(CustomOp, qualname)
