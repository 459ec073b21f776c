"""``record_stats()``: SPEC.md's load figures from compiled calls.

Recording is part of what a compiled graph depends on: entering or leaving ``record_stats``
changes the configuration version, so the backend compiles (once) a variant whose MoE layers
report their loads through the ``capmoe::observe`` op. Graphs compiled while nobody records
carry no such op: no extra outputs, no host synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from . import config
from .routing import capacity as _capacity

_active: list[Stats] = []


@dataclasses.dataclass
class LayerStats:
    """One MoE layer call. Loads are per-expert counts of computed (token, expert) pairs."""

    name: str
    tokens: int
    capacity: int | None
    loads_before: torch.Tensor
    loads_after: torch.Tensor
    dropped: int
    added: int

    @property
    def imbalance_before(self) -> float:
        """max_load / mean_load of the model's own selection."""
        return _imbalance(self.loads_before)

    @property
    def imbalance_after(self) -> float:
        return _imbalance(self.loads_after)

    @property
    def modeled_speedup(self) -> float:
        """SPEC.md's modeled expert-parallel speedup, max_load_before / max_load_after."""
        after = int(self.loads_after.max()) if self.loads_after.numel() else 0
        before = int(self.loads_before.max()) if self.loads_before.numel() else 0
        return before / after if after else 1.0


def _imbalance(loads: torch.Tensor) -> float:
    mean = loads.float().mean()
    return float(loads.max() / mean) if loads.numel() and mean > 0 else 1.0


@dataclasses.dataclass
class Stats:
    layers: list[LayerStats] = dataclasses.field(default_factory=list)


def is_recording() -> bool:
    return bool(_active)


@contextlib.contextmanager
def record_stats() -> Iterator[Stats]:
    """Collect :class:`LayerStats` of every compiled MoE layer call inside the block."""
    stats = Stats()
    _active.append(stats)
    config._bump()
    try:
        yield stats
    finally:
        _active.remove(stats)
        config._bump()


def _dense(ids: torch.Tensor, E: int) -> torch.Tensor:
    mask = torch.zeros(ids.shape[0], E + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids.long().clamp(0, E), True)[:, :E]


@torch.library.custom_op("capmoe::observe", mutates_args=())
def observe_op(
    ids_before: torch.Tensor,
    ids_after: torch.Tensor,
    name: str,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    capacity_align: int,
) -> torch.Tensor:
    """Record one layer call's loads; returns ``ids_after`` (a copy, so it is never elided)."""
    if _active:
        T, k = ids_before.shape
        before, after = _dense(ids_before, num_experts), _dense(ids_after, num_experts)
        cap = None
        if capacity_factor is not None:
            cap = int(_capacity(T, num_experts, k, capacity_factor, min_capacity, capacity_align))
        rec = LayerStats(
            name=name,
            tokens=T,
            capacity=cap,
            loads_before=before.sum(0).cpu(),
            loads_after=after.sum(0).cpu(),
            dropped=int((before & ~after).sum()),
            added=int((after & ~before).sum()),
        )
        for s in _active:
            s.layers.append(rec)
    return ids_after.clone()


@observe_op.register_fake
def _observe_fake(ids_before, ids_after, name, num_experts, capacity_factor, min_capacity, align):
    return torch.empty_like(ids_after)
