"""``record_stats()``: SPEC.md's load figures from compiled calls.

Every rewritten layer's ``capmoe::route_layer`` op checks one Python list when it runs; only
inside ``record_stats`` does it count loads (which synchronises with the device). Outside, it
costs that list check: no extra outputs, no host synchronisation, no recompile.

Prefill and decode. Every record says which kind of call it was (``LayerStats.phase``), from
the call's own shapes and nothing else, so it is the same whichever graph ran it: ``"decode"``
when each sequence of the call contributes exactly one row (``rows == B``: the one-new-token
step of generation with a KV cache), ``"prefill"`` otherwise (a prompt; a prefill chunk; or,
without a KV cache, the whole sequence recomputed at every step). ``B`` is the number of
sequences of the ``[B, S]`` the rows were flattened from; where the graph does not show that
structure (``explain`` says so) ``B`` counts as 1, so only a one-row call is ``"decode"``. A
prompt of a single token is ``"decode"`` too: it is the same call, with the same ``T``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

import torch

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
    sequences: int = 1  # B of the [B, S] the rows came from (1 where that is unknown)
    phase: str = "prefill"  # "decode": one row per sequence (see the module docstring)
    padding_excluded: bool = False  # padding rows were tied to the mask and left out
    capacity_factor: float | None = None  # the layer's gamma in this call (None: capacity off)
    exempt: bool = False  # capacity off for this layer only, by configure/exempt

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

    @property
    def prefill(self) -> list[LayerStats]:
        """The records of prefill calls (more than one row per sequence)."""
        return [s for s in self.layers if s.phase == "prefill"]

    @property
    def decode(self) -> list[LayerStats]:
        """The records of decode calls (one row per sequence)."""
        return [s for s in self.layers if s.phase == "decode"]


def is_recording() -> bool:
    return bool(_active)


@contextlib.contextmanager
def record_stats(*, warn_if_empty: bool = True) -> Iterator[Stats]:
    """Collect :class:`LayerStats` of every compiled MoE layer call inside the block.

    A block that saw no layer warns (the usual cause is a model that ran uncompiled), unless
    ``warn_if_empty`` is False (``explain``: a model without MoE layers is an answer there)."""
    stats = Stats()
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)
    if not stats.layers and warn_if_empty:
        warnings.warn(
            "capmoe: record_stats saw no capmoe MoE layer run. Either no layer was rewritten "
            "(capmoe_compile.explain says why), or the model ran uncompiled: "
            "torch.compile(model).generate(...) calls the original model's generate, which "
            "never enters the compiled code; compile in place with "
            "model.compile(backend='capmoe', options=...) and call model.generate(...)",
            stacklevel=3,
        )


def _dense(ids: torch.Tensor, E: int) -> torch.Tensor:
    mask = torch.zeros(ids.shape[0], E + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids.long().clamp(0, E), True)[:, :E]


def record(
    name: str,
    ids_before,
    ids_after,
    num_experts: int,
    opts,
    valid=None,
    num_sequences: int = 1,
    exempt: bool = False,
) -> None:
    """Append one layer call's figures to every active :func:`record_stats` block.

    With ``valid`` (padding excluded), padding rows count in neither ``tokens`` nor loads.
    ``capacity`` is the bound on any expert's load in the call: ``C`` for the batch scope, the
    sum of the sequences' ``C_s`` for the sequence scope.
    """
    T, k = ids_before.shape
    phase = "decode" if T == num_sequences else "prefill"
    rows = torch.ones(T, dtype=torch.bool) if valid is None else valid.cpu()
    cap = None
    if opts["capacity_factor"] is not None and int(rows.sum()) >= opts["min_tokens"]:
        groups = num_sequences if opts["capacity_scope"] == "sequence" else 1
        per_group = rows.view(groups, -1).sum(1)
        caps = _capacity(
            per_group,
            num_experts,
            k,
            opts["capacity_factor"],
            opts["min_capacity"],
            opts["capacity_align"],
        )
        cap = int(caps.sum())
    if valid is not None:
        ids_before, ids_after = ids_before[valid], ids_after[valid]
    T = ids_before.shape[0]
    before, after = _dense(ids_before, num_experts), _dense(ids_after, num_experts)
    rec = LayerStats(
        name=name,
        tokens=T,
        capacity=cap,
        loads_before=before.sum(0).cpu(),
        loads_after=after.sum(0).cpu(),
        dropped=int((before & ~after).sum()),
        added=int((after & ~before).sum()),
        sequences=num_sequences,
        phase=phase,
        padding_excluded=valid is not None,
        capacity_factor=opts["capacity_factor"],
        exempt=exempt,
    )
    for s in _active:
        s.layers.append(rec)
