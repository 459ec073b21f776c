"""Expert parallelism over ``torch.distributed`` (see ``README.md`` in this folder)."""

from __future__ import annotations

from .ep import (
    CallTiming,
    EPInfo,
    EPLayer,
    ep_experts_op,
    ep_moe_op,
    expert_parallel,
    layers,
    record_timings,
    route_group,
)

__all__ = [
    "CallTiming",
    "EPInfo",
    "EPLayer",
    "ep_experts_op",
    "ep_moe_op",
    "expert_parallel",
    "layers",
    "record_timings",
    "route_group",
]
