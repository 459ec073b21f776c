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
    reports = rewrite_moe_layers(gm, list(example_inputs), options)
    gm.meta["capmoe_reports"] = reports  # for a trial the bridge drops (explain still says why)
    for r in reports:
        if not r.matched and (r.name, r.reason) not in _warned:
            _warned.add((r.name, r.reason))
            log.warning("capmoe: left %s as written: %s", r.name, r.reason)
    graph_tensors = [*example_inputs, *gm.parameters(), *gm.buffers()]
    module_config.warn_unmatched(graph_tensors, [r.params for r in reports if r.matched])
    return reports
