"""Expert parallelism over ``torch.distributed`` (see ``README.md`` in this folder).

Importing the package registers the expert-parallel lowering with ``capmoe_compile.pipeline``.
"""

from __future__ import annotations

from . import lowering as _lowering  # noqa: F401 - registers the EP lowering
from .ep import ep_experts_op, ep_moe_op, expert_parallel
from .group import CallTiming, EPInfo, EPLayer, layers, record_timings, route_group

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
