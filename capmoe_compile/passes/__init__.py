"""Graph passes of the capmoe backend: find MoE layers and rewrite them (see moe_layers.py)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import config, module_config
from .moe_layers import LayerReport, rewrite_moe_layers

log = logging.getLogger("capmoe_compile")
_warned: set[tuple[str, str]] = set()


def _overrides(params: list[torch.Tensor], classes: list[type]) -> dict[str, Any]:
    """Per-module overrides for a layer: classes on its module path (outer first), then the
    registered instances that own its parameters (outer, i.e. larger, first)."""
    out: dict[str, Any] = {}
    for cls in classes:
        out.update(module_config.options_for(cls))
    ptrs = {p.data_ptr() for p in params}
    owners = []
    for mod in list(module_config._by_instance.keys()):
        n = sum(1 for _ in mod.parameters())
        if any(p.data_ptr() in ptrs for p in mod.parameters()):
            owners.append((-n, mod))
    for _, mod in sorted(owners, key=lambda t: t[0]):
        out.update(module_config._by_instance.get(mod, {}))
    return out


def resolve_layer(
    options: Mapping[str, Any] | None, params: list[torch.Tensor], classes: list[type]
) -> dict[str, Any]:
    """A layer's effective options: config < ``options=`` < per-module overrides."""
    return {**config.resolve(options), **_overrides(params, classes)}


def run_passes(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None,
) -> list[LayerReport]:
    """Rewrite ``gm``'s MoE layers in place; return one report per router-like site.

    ``example_inputs`` must be real tensors: every rewrite is checked against the layer's own
    computation on them before it is made.
    """
    config.resolve(options)  # bad options fail here, at compile time
    reports = rewrite_moe_layers(gm, list(example_inputs), options, resolve_layer)
    for r in reports:
        if not r.matched and (r.name, r.reason) not in _warned:
            _warned.add((r.name, r.reason))
            log.warning("capmoe: left %s as written: %s", r.name, r.reason)
    return reports
