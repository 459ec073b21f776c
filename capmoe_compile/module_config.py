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
