"""Capacity planning from telemetry: which experts to copy, onto which ranks, and gamma.

    with capmoe_compile.record_stats() as st:          # capacity off, calibration batches
        for ids in batches:
            compiled(ids)
    loads = capmoe_compile.plan.layer_loads(st)        # or save_loads(st, "loads.json")
    p = capmoe_compile.plan.plan(loads, ranks=8, spare_slots=8, max_drop=0.01)
    p.save("plan.json")                                # capmoe plan loads.json --ranks 8 ...

A plan holds, per layer, a :class:`~capmoe_compile.replicas.Placement` (SPEC.md "Redundant
expert copies") and a capacity factor ``gamma`` (per copy: ``C = ceil(gamma T k / (E + R))``).

The placement algorithm
-----------------------
It starts from the greedy packing the EPLB projects describe (DeepSeek's ``eplb.py``, used by
vLLM and SGLang): (1) *replicate*: give the ``R`` spare slots one at a time to the expert with
the largest expected load per copy (mean load over the recorded calls / copies); (2) *pack*:
take the copies by expected load, largest first, and put each on the rank with the smallest
expected load that still has a free slot. Where this one differs:

- it packs each copy with its *round-robin* load (copies of one expert split its pairs evenly,
  SPEC's default copy choice), and avoids putting two copies of one expert on one rank when
  another rank has room (such a pair balances nothing);
- (3) *refine*: a local search over swaps of two copies on different ranks that minimises the
  straggler the layer actually pays, ``sum over recorded calls of max_rank load`` (after
  capacity when gamma is set), not the balance of the mean load: a placement balanced on
  average can still have a hot rank in every call;
- capacity is planned with the copies: with ``max_drop`` the plan takes the smallest gamma of a
  grid whose modeled share of dropped pairs over the recorded calls stays within ``max_drop``
  (the drop count of ``score``/``order``/``reverse``/``random`` depends only on the loads, so
  it is exact from telemetry).

The straggler model
-------------------
:func:`rank_loads` gives, per recorded call, each rank's modeled work: the sum over its copies
of ``min(copy load, C)`` (pairs computed). A layer's time is its most loaded rank's work (SPEC
"Load figures with copies"); :func:`simulate` compares baseline (``E / N`` contiguous experts a
rank, no capacity), replicas alone, capacity alone (same slots, no copies: the ``E`` experts
packed by the same greedy) and both, for any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .plan_calibrate import UNIFORM_GAMMAS as UNIFORM_GAMMAS
from .plan_calibrate import calibrate_checked as calibrate_checked
from .replicas import Placement
from .routing import capacity

__all__ = [
    "GAMMAS",
    "LayerLoads",
    "Plan",
    "layer_loads",
    "load_loads",
    "pack",
    "plan",
    "place",
    "rank_loads",
    "replicate",
    "save_loads",
    "simulate",
]

FORMAT = "capmoe-plan"
LOADS_FORMAT = "capmoe-loads"
#: The gammas ``max_drop`` chooses among (largest first).
GAMMAS: tuple[float, ...] = (
    4.0, 3.0, 2.5, 2.0, 1.75, 1.5, 1.375, 1.25, 1.125, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5
)  # fmt: skip


@dataclasses.dataclass
class LayerLoads:
    """One layer's recorded calls: ``loads`` [calls, E] pairs per expert (capacity off, i.e.
    ``loads_before``), ``tokens`` [calls] and the layer's ``top_k``."""

    loads: torch.Tensor
    tokens: torch.Tensor
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "tokens": self.tokens.tolist(), "loads": self.loads.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerLoads:
        return cls(
            torch.tensor(d["loads"], dtype=torch.int64),
            torch.tensor(d["tokens"], dtype=torch.int64),
            int(d["top_k"]),
        )


def layer_loads(stats, phase: str | None = "prefill") -> dict[str, LayerLoads]:
    """Per layer, the calls a :func:`capmoe_compile.record_stats` block saw (``stats``:
    its ``Stats`` or a list of ``LayerStats``), ``loads_before`` of each. ``top_k`` is read
    from the loads (pairs / tokens)."""
    records = getattr(stats, "layers", stats)
    out: dict[str, list] = {}
    for s in records:
        if phase is not None and s.phase != phase:
            continue
        out.setdefault(s.name, []).append(s)
    result = {}
    for name, recs in out.items():
        loads = torch.stack([r.loads_before.long() for r in recs])
        tokens = torch.tensor([r.tokens for r in recs], dtype=torch.int64)
        k = max(1, round(float(loads.sum()) / max(1, int(tokens.sum()))))
        result[name] = LayerLoads(loads, tokens, k)
    if not result:
        raise ValueError("no recorded layer calls (record_stats over a compiled model first)")
    return result


def save_loads(stats, path: str | Path, phase: str | None = "prefill") -> Path:
    """Write :func:`layer_loads` of ``stats`` as JSON (what ``capmoe plan`` reads)."""
    loads = stats if isinstance(stats, dict) else layer_loads(stats, phase)
    data = {"format": LOADS_FORMAT, "layers": {n: v.to_dict() for n, v in loads.items()}}
    p = Path(path)
    p.write_text(json.dumps(data))
    return p


def load_loads(path: str | Path) -> dict[str, LayerLoads]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != LOADS_FORMAT:
        raise ValueError(f"{path}: not a {LOADS_FORMAT} file (write one with plan.save_loads)")
    return {n: LayerLoads.from_dict(v) for n, v in data["layers"].items()}


# --------------------------------------------------------------------------------------------
# the straggler model
# --------------------------------------------------------------------------------------------


def copy_loads(loads: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[calls, E'] pairs of each copy under SPEC's round robin: copy ``i`` of ``n`` copies of
    an expert with ``N`` pairs gets ``ceil((N - i) / n)``."""
    Ep = placement.num_copies
    expert_of = torch.tensor(placement.expert_of)
    n = torch.bincount(expert_of, minlength=placement.num_experts)
    idx = torch.zeros(Ep, dtype=torch.int64)
    seen: dict[int, int] = {}
    for p, e in enumerate(placement.expert_of):
        idx[p] = seen.get(e, 0)
        seen[e] = idx[p].item() + 1
    N = loads[:, expert_of]
    return (N - idx + n[expert_of] - 1).div(n[expert_of], rounding_mode="floor").clamp_min(0)


def _caps(tokens: torch.Tensor, slots: int, k: int, gamma: float | None) -> torch.Tensor:
    if gamma is None:
        return torch.full(tokens.shape, torch.iinfo(torch.int64).max // 4, dtype=torch.int64)
    return capacity(tokens, slots, k, gamma)


def rank_loads(ll: LayerLoads, placement: Placement, gamma: float | None) -> torch.Tensor:
    """[calls, ranks] pairs each rank computes: its copies' ``min(load, C)``, with
    ``C = ceil(gamma T k / E')`` (no bound when gamma is None)."""
    cl = copy_loads(ll.loads, placement)
    C = _caps(ll.tokens, placement.num_copies, ll.top_k, gamma)
    kept = torch.minimum(cl, C[:, None])
    out = torch.zeros(cl.shape[0], placement.num_ranks, dtype=torch.int64)
    return out.index_add_(1, torch.tensor(placement.rank_of), kept)


def _cost(ll: LayerLoads, placement: Placement, gamma: float | None) -> int:
    """The straggler a layer pays over its recorded calls: sum of per-call max rank load."""
    return int(rank_loads(ll, placement, gamma).amax(1).sum())


def dropped_share(ll: LayerLoads, placement: Placement, gamma: float | None) -> float:
    total = int(ll.loads.sum())
    kept = int(rank_loads(ll, placement, gamma).sum())
    return (total - kept) / total if total else 0.0


# --------------------------------------------------------------------------------------------
# the placement
# --------------------------------------------------------------------------------------------


def replicate(mean_load: Sequence[float], redundant: int) -> list[int]:
    """EPLB's step: copies per expert, each spare slot to the largest load per copy (ties:
    smaller expert)."""
    n = [1] * len(mean_load)
    for _ in range(redundant):
        e = max(range(len(n)), key=lambda i: (mean_load[i] / n[i], -i))
        n[e] += 1
    return n


def pack(copy_weight: Sequence[tuple[int, float]], ranks: int, slots: int) -> list[list[int]]:
    """EPLB's balanced packing of copies ``(expert, expected load)`` onto ``ranks`` ranks of
    ``slots`` slots: largest first, each to the least loaded rank with a free slot, a rank that
    holds no copy of the expert yet preferred. Returns each rank's experts."""
    if len(copy_weight) > ranks * slots:
        raise ValueError(f"{len(copy_weight)} copies do not fit {ranks} ranks x {slots} slots")
    order = sorted(range(len(copy_weight)), key=lambda i: (-copy_weight[i][1], i))
    held: list[list[int]] = [[] for _ in range(ranks)]
    load = [0.0] * ranks
    for i in order:
        e, w = copy_weight[i]
        free = [r for r in range(ranks) if len(held[r]) < slots]
        fresh = [r for r in free if e not in held[r]] or free
        r = min(fresh, key=lambda r: (load[r], len(held[r]), r))
        held[r].append(e)
        load[r] += w
    return held


def _placement(held: list[list[int]], E: int) -> Placement:
    return Placement.from_copies(E, [sorted(h) for h in held])


def place(
    ll: LayerLoads,
    ranks: int,
    slots_per_rank: int,
    redundant: int,
    gamma: float | None = None,
    refine_passes: int = 4,
) -> Placement:
    """A layer's placement: EPLB's replicate + pack, then swap refinement on the recorded
    calls' straggler (see the module docstring). ``redundant`` = 0: the ``E`` experts packed
    without copies."""
    E = ll.num_experts
    mean = ll.loads.float().mean(0).tolist()
    n = replicate(mean, redundant)
    copies = [(e, mean[e] / n[e]) for e in range(E) for _ in range(n[e])]
    held = pack(copies, ranks, slots_per_rank)
    first = _placement(held, E)
    if refine_passes <= 0:
        return first
    held = _refine(ll, first, ranks, slots_per_rank, gamma, refine_passes)
    held = _retarget(ll, held, E, gamma, refine_passes)
    held = _refine(ll, _placement(held, E), ranks, slots_per_rank, gamma, refine_passes)
    second = _placement(held, E)
    # the refinement moves copies with their loads fixed; renumbering can shift a pair
    # between copies of one expert, so keep whichever is better exactly
    return second if _cost(ll, second, gamma) <= _cost(ll, first, gamma) else first


def _retarget(ll, held, E, gamma, passes) -> list[list[int]]:
    """Which experts get the redundant copies, revisited: a copy of an expert with more than
    one copy may become a copy of any other expert (same rank) where that lowers the exact
    straggler cost without dropping more pairs (under capacity, fewer copies of a hot expert
    would "win" by dropping its pairs). EPLB fixes this choice on the mean load alone."""

    def score(h):
        rl = rank_loads(ll, _placement(h, E), gamma)
        return int(rl.amax(1).sum()), int(rl.sum())

    cost, kept = score(held)
    for _ in range(passes):
        improved = False
        for r in range(len(held)):
            for i in range(len(held[r])):
                if sum(x.count(held[r][i]) for x in held) < 2:
                    continue
                for b in range(E):
                    if b == held[r][i]:
                        continue
                    cand = [list(x) for x in held]
                    cand[r][i] = b
                    c, k = score(cand)
                    if c < cost and k >= kept:
                        held, cost, kept, improved = cand, c, k, True
        if not improved:
            break
    return held


def _refine(ll, pl: Placement, ranks, slots, gamma, passes) -> list[list[int]]:
    """Swap/move local search on ``sum_calls max_rank load`` with each copy's kept loads fixed
    (those of ``pl``'s numbering)."""
    cl = copy_loads(ll.loads, pl)
    C = _caps(ll.tokens, pl.num_copies, ll.top_k, gamma)
    kept = torch.minimum(cl, C[:, None])  # [calls, E']
    calls = kept.shape[0]
    zero = torch.zeros(calls, 1, dtype=kept.dtype)
    kept = torch.cat([kept, zero], 1)  # column E' is an empty slot
    empty = pl.num_copies
    slot = [[p for p in range(pl.num_copies) if pl.rank_of[p] == r] for r in range(ranks)]
    for r in range(ranks):
        slot[r] += [empty] * (slots - len(slot[r]))
    RL = torch.stack([kept[:, slot[r]].sum(1) for r in range(ranks)], 1)  # [calls, N]
    cost = int(RL.amax(1).sum())
    for _ in range(passes):
        improved = False
        for a in range(ranks):
            for b in range(a + 1, ranks):
                others = torch.cat([RL[:, :a], RL[:, a + 1 : b], RL[:, b + 1 :]], 1)
                om = others.amax(1) if others.shape[1] else torch.zeros(calls, dtype=RL.dtype)
                for i in range(slots):
                    for j in range(slots):
                        p, q = slot[a][i], slot[b][j]
                        if p == q:  # both empty
                            continue
                        d = kept[:, p] - kept[:, q]
                        na, nb = RL[:, a] - d, RL[:, b] + d
                        c = int(torch.maximum(om, torch.maximum(na, nb)).sum())
                        if c < cost:
                            cost, improved = c, True
                            RL[:, a], RL[:, b] = na, nb
                            slot[a][i], slot[b][j] = q, p
        if not improved:
            break
    return [[pl.expert_of[p] for p in s if p != empty] for s in slot]


def slots_for(E: int, ranks: int, spare_per_rank: int) -> int:
    """Slots per rank: enough for the ``E`` experts, plus ``spare_per_rank``."""
    return math.ceil(E / ranks) + spare_per_rank


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Per layer: ``placement`` (a :class:`Placement`), ``capacity_factor`` (per copy) and
    ``policy``; ``ranks``, ``slots_per_rank`` and the modeled figures as a record."""

    ranks: int
    slots_per_rank: int
    layers: dict[str, dict[str, Any]]
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    def placement(self, name: str) -> Placement:
        return Placement.from_dict(self.layers[name]["placement"])

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """``capmoe_compile.configure`` each planned layer of ``model`` (a module path as
        ``record_stats`` names it) with the plan's capacity factor and policy. The gamma is
        per copy: shard with ``expert_parallel(model, placement=plan)`` so that ``C`` counts
        the layer's ``E + R`` copies. Returns ``model``."""
        from .module_config import configure

        for name, layer in self.layers.items():
            configure(
                model.get_submodule(name),
                capacity_factor=layer.get("capacity_factor"),
                policy=layer.get("policy", "score"),
            )
        return model

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "ranks": self.ranks,
            "slots_per_rank": self.slots_per_rank,
            "layers": self.layers,
            "record": self.record,
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        for name, layer in d["layers"].items():
            Placement.from_dict(layer["placement"])  # validates
            if layer.get("capacity_factor") is not None and layer["capacity_factor"] <= 0:
                raise ValueError(f"{path}: layer {name}: capacity_factor must be > 0")
        return cls(d["ranks"], d["slots_per_rank"], d["layers"], d.get("record", {}))


def choose_gamma(ll: LayerLoads, placement: Placement, max_drop: float, gammas=GAMMAS):
    """The smallest gamma of ``gammas`` whose modeled dropped share is within ``max_drop``
    (None where even the largest drops more)."""
    best = None
    for g in sorted(gammas, reverse=True):
        if dropped_share(ll, placement, g) <= max_drop:
            best = g
        else:
            break
    return best


def plan(
    loads: Mapping[str, LayerLoads],
    ranks: int,
    spare_per_rank: int = 1,
    *,
    gamma: float | None = None,
    max_drop: float | None = None,
    policy: str = "score",
    replicas: bool = True,
    gammas: Sequence[float] = GAMMAS,
) -> Plan:
    """A :class:`Plan` for ``ranks`` ranks of ``ceil(E / ranks) + spare_per_rank`` slots.

    Capacity: ``gamma`` (one for every layer), or ``max_drop`` (per layer, the smallest gamma
    of ``gammas`` dropping at most that share of pairs on the recorded calls), or neither
    (capacity off). ``replicas=False`` packs the experts without copies (capacity alone)."""
    if gamma is not None and max_drop is not None:
        raise ValueError("give gamma or max_drop, not both")
    layers = {}
    base_tot = plan_tot = 0
    for name, ll in loads.items():
        E = ll.num_experts
        slots = slots_for(E, ranks, spare_per_rank)
        R = ranks * slots - E if replicas else 0
        g = gamma
        pl = place(ll, ranks, slots, R, g)
        if max_drop is not None:
            g = choose_gamma(ll, pl, max_drop, gammas)
            pl = place(ll, ranks, slots, R, g)  # refined against the capacity it will run
            g2 = choose_gamma(ll, pl, max_drop, gammas)
            g = g2 if g2 is not None and (g is None or g2 < g) else g
        base = _cost(ll, Placement.identity(E, ranks), None)
        cost = _cost(ll, pl, g)
        base_tot, plan_tot = base_tot + base, plan_tot + cost
        layers[name] = {
            "placement": pl.to_dict(),
            "capacity_factor": g,
            "policy": policy,
            "split": "round_robin",
            "modeled": {
                "calls": int(ll.loads.shape[0]),
                "top_k": ll.top_k,
                "baseline_straggler": base,
                "plan_straggler": cost,
                "speedup": base / cost if cost else 1.0,
                "dropped_share": dropped_share(ll, pl, g),
            },
        }
    record = {
        "algorithm": "eplb-greedy+round-robin-pack+swap-refine",
        "spare_per_rank": spare_per_rank,
        "replicas": replicas,
        "gamma": gamma,
        "max_drop": max_drop,
        "modeled_speedup": base_tot / plan_tot if plan_tot else 1.0,
    }
    return Plan(ranks, slots_for(next(iter(loads.values())).num_experts, ranks, spare_per_rank),
                layers, record)  # fmt: skip


def simulate(
    loads: Mapping[str, LayerLoads],
    ranks: int,
    spare_per_rank: int = 1,
    *,
    gamma_capacity: float | None,
    gamma_both: float | None,
) -> dict[str, Any]:
    """Modeled MoE time (sum over layers and calls of the most loaded rank's pairs) of four
    setups on ``ranks`` ranks with the same slots: ``baseline`` (contiguous experts, capacity
    off), ``replicas`` (the plan's copies, capacity off), ``capacity`` (no copies, the experts
    packed by the same greedy, ``gamma_capacity``), ``both`` (copies and ``gamma_both`` per
    copy); with speedups against baseline, dropped shares, and per layer/call times."""
    setups = {
        "baseline": None,
        "replicas": dict(replicas=True, gamma=None),
        "capacity": dict(replicas=False, gamma=gamma_capacity),
        "both": dict(replicas=True, gamma=gamma_both),
    }
    out: dict[str, Any] = {"ranks": ranks, "spare_per_rank": spare_per_rank, "setups": {}}
    for key, kw in setups.items():
        total = dropped = pairs = 0
        per_layer = {}
        for name, ll in loads.items():
            E = ll.num_experts
            if kw is None:
                pl, g = Placement.identity(E, ranks), None
            else:
                slots = slots_for(E, ranks, spare_per_rank)
                R = ranks * slots - E if kw["replicas"] else 0
                g = kw["gamma"]
                pl = place(ll, ranks, slots, R, g)
            rl = rank_loads(ll, pl, g)
            t = rl.amax(1)
            per_layer[name] = t.tolist()
            total += int(t.sum())
            pairs += int(ll.loads.sum())
            dropped += int(ll.loads.sum()) - int(rl.sum())
        out["setups"][key] = {
            "time": total,
            "dropped_share": dropped / pairs if pairs else 0.0,
            "per_layer_call": per_layer,
        }
    base = out["setups"]["baseline"]["time"]
    for v in out["setups"].values():
        v["speedup"] = base / v["time"] if v["time"] else 1.0
    return out
