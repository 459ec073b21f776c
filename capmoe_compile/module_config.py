"""Per-module configuration: the most specific layer of capmoe-compile's configuration.

Overrides attach to an ``nn.Module`` subclass (every instance, subclasses included) or to one
instance, and win over ``capmoe_compile.config`` and ``torch.compile(options=...)``::

    configure(model.layers[0].mlp, capacity_factor=2.0)
    exempt(model.layers[-1].mlp)                 # this layer keeps its full routing

    @configure(policy="order")
    class MyMoE(nn.Module): ...

Every change bumps ``config.version()``, so compiled layers resolve their options again on the
next call; only a change of a layer's routed width (``expanded_drop``) recompiles its frame,
through the guard of ``pipeline.guard_width``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch
from torch import nn

from . import config

_T = TypeVar("_T", bound="nn.Module | type[nn.Module]")

_by_instance: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
_by_class: dict[type[nn.Module], dict[str, Any]] = {}


def _check_target(target: object) -> None:
    if isinstance(target, nn.Module):
        return
    if isinstance(target, type) and issubclass(target, nn.Module):
        return
    raise TypeError(
        f"capmoe configure/exempt needs an nn.Module instance or subclass, got {target!r}"
    )


@overload
def configure(target: _T, /, **options: Any) -> _T: ...
@overload
def configure(target: None = None, /, **options: Any) -> Callable[[_T], _T]: ...
def configure(target: Any = None, /, **options: Any) -> Any:
    """Override options for a module instance or class; with no target, a class decorator."""
    if target is None:
        return lambda t: configure(t, **options)
    _check_target(target)
    validated = {name: config.validate(name, value) for name, value in options.items()}
    registry: Any = _by_class if isinstance(target, type) else _by_instance
    registry.setdefault(target, {}).update(validated)
    config._bump()
    return target


def exempt(target: _T, /) -> _T:
    """Leave ``target``'s MoE layers exactly as written (``capacity_factor=None``)."""
    return configure(target, capacity_factor=None)


def options_for(module: nn.Module | type[nn.Module]) -> dict[str, Any]:
    """The overrides that apply to ``module``: its classes' by MRO, then its own."""
    cls = module if isinstance(module, type) else type(module)
    out: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        out.update(_by_class.get(base, {}))
    if not isinstance(module, type):
        out.update(_by_instance.get(module, {}))
    return out


def clear(target: nn.Module | type[nn.Module] | None = None, /) -> None:
    """Remove the overrides of ``target``, or all overrides when ``target`` is None."""
    if target is None:
        _by_class.clear()
        _by_instance.clear()
    elif isinstance(target, type):
        _by_class.pop(target, None)
    else:
        _by_instance.pop(target, None)
    config._bump()


def _overrides(params: list, classes: list[type]) -> dict[str, Any]:
    """Per-module overrides for a layer: classes on its module path (outer first), then the
    registered instances that own its parameters (outer, i.e. larger, first)."""
    out: dict[str, Any] = {}
    for cls in classes:
        out.update(options_for(cls))
    ptrs = {p.data_ptr() for p in params}
    owners = []
    for mod in list(_by_instance.keys()):
        n = sum(1 for _ in mod.parameters())
        if any(p.data_ptr() in ptrs for p in mod.parameters()):
            owners.append((-n, mod))
    for _, mod in sorted(owners, key=lambda t: t[0]):
        out.update(_by_instance.get(mod, {}))
    return out


def resolve_layer(
    options: Mapping[str, Any] | None, params: list, classes: list[type]
) -> dict[str, Any]:
    """A layer's effective options: config < ``options=`` < per-module overrides (of the
    classes on its module path and of the modules that own its expert ``params``)."""
    return {**config.resolve(options), **_overrides(params, classes)}


# Instances whose parameters a compile has seen all of, so warn_unmatched has judged them once.
_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def warn_unmatched(graph_tensors: list, layer_params: list[list]) -> None:
    """Warn where a configured instance has no matched MoE layer under it, at the first compile
    whose graph holds all of its parameters (one that holds only some, across a graph break,
    cannot tell): its options apply to nothing, e.g. ``configure(model.layers[0].self_attn)``.
    ``layer_params``: the expert parameters of each layer the passes matched in that graph."""
    import warnings

    def ptrs(tensors) -> set[int]:
        out = set()
        for t in tensors:
            try:
                out.add(t.data_ptr())
            except Exception:  # noqa: BLE001 - a fake or meta tensor holds no storage
                pass
        return out

    in_graph = ptrs(t for t in graph_tensors if isinstance(t, torch.Tensor))
    layers = [ptrs(p) for p in layer_params]
    for mod, opts in list(_by_instance.items()):
        if mod in _checked:
            continue
        own = ptrs(mod.parameters())
        if own and not own <= in_graph:
            continue
        _checked.add(mod)
        if not any(own & layer for layer in layers):
            warnings.warn(
                f"capmoe: configure({type(mod).__name__} instance, "
                f"{', '.join(f'{k}={v!r}' for k, v in opts.items())}) has no MoE layer under it "
                "that the capmoe passes matched, so its options apply to nothing: configure the "
                "MoE block (capmoe_compile.explain lists the matched layers by name) or a module "
                "above it",
                stacklevel=2,
            )
