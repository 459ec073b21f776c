"""What every EP path shares: the group, its layers, collectives, and the group's routing.

:class:`EPInfo` says how one layer's experts are spread over the ranks of a group,
:class:`EPLayer` records a sharded layer (its verified form and the rank's own expert
weights), and :func:`route_group` applies SPEC.md's capacity policy to the tokens of the whole
group (identically on every rank). ``ep.py`` (sharding, the opaque ops) and ``functional.py``
(the static form) build on this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..experts import ExpertForm, moe_experts_reference
from ..lowering import grouped
from ..replicas import Placement, route_replicas
from ..routing import (
    capacity,
    renormalized,
    route_reference,
    route_with_options,
    token_scale,
    widens,
)


@dataclasses.dataclass(frozen=True)
class EPInfo:
    """How one MoE layer's routed experts are sharded."""

    group: Any  # the ProcessGroup (None: the default group)
    rank: int
    world: int
    num_experts: int  # E, global
    first_expert: int  # first global expert id held here
    num_local: int  # E / world

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(expert_ids, self.num_local, rounding_mode="floor")


@dataclasses.dataclass
class EPLayer:
    """One sharded layer: what the passes verified before sharding, and this rank's weights."""

    name: str
    info: EPInfo
    form: ExpertForm
    local: list[torch.Tensor]  # this rank's experts, one tensor per role of ``form``
    param_names: tuple[str, ...] = ()  # the model's parameters ``local`` came from
    dispatch: str = "auto"  # "auto": static functional collectives where they apply
    compiled_as: str = ""  # what the EP lowering chose last: "static" or "opaque: <why>"
    #: SPEC's redundant copies (None: expert e on rank e // (E / W)). With a placement,
    #: ``local`` holds this rank's copies in ascending copy id, and ``info.num_local`` counts
    #: them (``info.first_expert`` is -1: ranks hold no contiguous range).
    placement: Placement | None = None

    def copy_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank_of [E'], local_index [E'])``: the rank holding each copy and its row in
        that rank's ``local`` weights."""
        pl = self.placement
        rank_of = torch.tensor(pl.rank_of, dtype=torch.int64)
        seen: dict[int, int] = {}
        idx = []
        for r in pl.rank_of:
            idx.append(seen.get(r, 0))
            seen[r] = idx[-1] + 1
        return rank_of, torch.tensor(idx, dtype=torch.int64)


#: Every EP layer, indexed by the ``key`` the ops carry.
_EP_LAYERS: list[EPLayer] = []


def layers() -> list[EPLayer]:
    """Every layer ``expert_parallel`` sharded in this process, in order."""
    return list(_EP_LAYERS)


def register(layer: EPLayer) -> int:
    _EP_LAYERS.append(layer)
    return len(_EP_LAYERS) - 1


def get(key: int) -> EPLayer:
    return _EP_LAYERS[key]


# ---------------------------------------------------------------------------------------------
# timings (benchmarks)


@dataclasses.dataclass
class CallTiming:
    name: str
    compute_s: float = 0.0  # local expert GEMMs
    comm_s: float = 0.0  # inside collectives (waiting for the slowest rank included)
    route_s: float = 0.0  # capacity policy on the group's routing metadata
    total_s: float = 0.0
    recv_rows: int = 0  # (token, expert) rows this rank's experts computed


_timings: list[list[CallTiming]] = []


@contextlib.contextmanager
def record_timings() -> Iterator[list[CallTiming]]:
    """Collect one :class:`CallTiming` per EP layer call made inside the block."""
    out: list[CallTiming] = []
    _timings.append(out)
    try:
        yield out
    finally:
        _timings.remove(out)


class Clock:
    def __init__(self, name: str):
        self.t = CallTiming(name)
        self.on = bool(_timings)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def part(self, field: str):
        if not self.on:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.t, field, getattr(self.t, field) + time.perf_counter() - t0)

    def done(self):
        if self.on:
            self.t.total_s = time.perf_counter() - self.start
            for sink in _timings:
                sink.append(self.t)


# ---------------------------------------------------------------------------------------------
# collectives


def check_agreement(info: EPInfo, header: torch.Tensor, what: str) -> torch.Tensor:
    """All-gather each rank's int64 header ``[T_r, fingerprint, ...]``; the fingerprints must
    agree, else every rank raises the same RuntimeError."""
    out = [torch.empty_like(header) for _ in range(info.world)]
    dist.all_gather(out, header, group=info.group)
    got = torch.stack(out)
    fps = got[:, 1].tolist()
    if len(set(fps)) != 1:
        raise RuntimeError(
            f"capmoe EP: ranks disagree on the configuration of {what} (fingerprints by rank: "
            f"{fps}); every rank must compile the same model with the same capmoe options"
        )
    return got


def fingerprint(obj: Any) -> int:
    s = json.dumps(obj, sort_keys=True, default=str)
    return zlib.crc32(s.encode()) & 0x7FFFFFFF


def all_gather_rows(info: EPInfo, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenation over ranks of ``t`` [T_r, ...] (uneven T_r: padded to the max)."""
    m = max(counts)
    pad = t.new_zeros((m, *t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(info.world)]
    dist.all_gather(out, pad, group=info.group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


def options_fingerprint(opts: dict) -> int:
    """The fingerprint of resolved options as every rank must agree on them (``local_experts``,
    a single-device knob, is ignored under EP)."""
    return fingerprint([{k: v for k, v in opts.items() if k != "local_experts"}])


# ---------------------------------------------------------------------------------------------
# the experts stage on received rows


def apply_local_experts(rows, expert_ids, params, form: ExpertForm | str) -> torch.Tensor:
    """``expert_{expert_ids[i]}(rows[i])`` for every received row (no weighting: the combine
    weights on the token's rank). The experts stage with one expert per row and unit weights."""
    form = ExpertForm.from_str(form) if isinstance(form, str) else form
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    if grouped.supports(form, rows.dtype):
        return grouped.moe_experts_grouped(rows, expert_ids[:, None], ones, params, form)
    return moe_experts_reference(rows, expert_ids[:, None], ones, params, form)


# ---------------------------------------------------------------------------------------------
# the capacity policy on the group's tokens


def route_group(
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    rank_of_row: torch.Tensor,
    info: EPInfo,
    opts: dict,
    row_counts: list[int],
    seq_counts: list[int],
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC's capacity policy on the group's tokens (the concatenation of every rank's rows).

    Deterministic and computed identically on every rank. ``expanded_drop`` uses, for each
    row, the experts of the rank that holds it (a token's extra experts cost no
    communication). ``capacity_scope="sequence"`` routes each sequence on its own (equal to
    routing the concatenation, and needs no equal sequence lengths across ranks).
    """
    T, E = probs.shape
    n_valid = T if valid is None else int(valid.sum())
    gamma = opts["capacity_factor"]
    if gamma is None or T == 0 or n_valid < opts["min_tokens"]:
        return _pad(ids, weights, opts, info, E)
    if not widens(opts["policy"]) and opts["capacity_scope"] == "batch":
        return route_with_options(
            probs, ids, weights, opts, local_experts=None, min_tokens=0, valid=valid
        )
    outs_i, outs_w = [], []
    blocks = (
        [(0, T, 1)]
        if opts["capacity_scope"] == "batch"
        else [(s, c, n) for s, c, n in zip(starts(row_counts), row_counts, seq_counts, strict=True)]
    )
    for s0, n, nseq in blocks:
        sl = slice(s0, s0 + n)
        v = None if valid is None else valid[sl]
        if n == 0:
            oi, ow = _pad(ids[sl], weights[sl], opts, info, E)
        elif widens(opts["policy"]):  # expanded_drop: candidates on each rank
            oi, ow = _expanded_drop_ep(
                probs[sl], ids[sl], weights[sl], rank_of_row[sl], info, opts, v, nseq
            )
        else:
            oi, ow = route_with_options(
                probs[sl],
                ids[sl],
                weights[sl],
                opts,
                local_experts=None,
                min_tokens=0,
                capacity_scope="sequence",
                num_sequences=max(nseq, 1),
                valid=v,
            )
        outs_i.append(oi)
        outs_w.append(ow)
    return torch.cat(outs_i), torch.cat(outs_w)


def route_group_copies(
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    rank_of_row: torch.Tensor,
    placement: Placement,
    opts: dict,
    row_counts: list[int],
    seq_counts: list[int],
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC's "Redundant expert copies" on the group's tokens: ``(ids, weights, copy_ids)``.

    ``capmoe_compile.replicas.route_replicas`` on the concatenation of every rank's rows
    (identical on every rank), with ``expanded_drop``'s local copies ``L(t)`` = the copies on
    the rank holding ``t``. Copies split by the placement's shares when it has them, else
    round robin. ``capacity_scope="sequence"`` routes the concatenation's sequences (ranks
    with unequal sequence lengths: each rank's block on its own, rows numbered from 0 in each
    block, which only ``random``'s key sees)."""
    split = "share" if placement.shares is not None else "round_robin"
    kw = dict(
        capacity_factor=opts["capacity_factor"],
        policy=opts["policy"],
        split=split,
        renormalize=opts["renormalize"],
        reroute_rounds=opts["reroute_rounds"],
        seed=opts["seed"],
        min_capacity=opts["min_capacity"],
        capacity_align=opts["capacity_align"],
    )
    T = probs.shape[0]
    n_valid = T if valid is None else int(valid.sum())
    small = opts["capacity_factor"] is not None and n_valid < opts["min_tokens"]
    if opts["capacity_scope"] == "batch" or small or opts["capacity_factor"] is None or T == 0:
        r = route_replicas(
            probs, ids, weights, placement, token_rank=rank_of_row, valid=valid,
            min_tokens=opts["min_tokens"], capacity_scope="batch", **kw,
        )  # fmt: skip
        return r.ids, r.weights, r.copy_ids
    lengths = {c // s for c, s in zip(row_counts, seq_counts, strict=True) if c}
    if len(lengths) == 1 and all(c % s == 0 for c, s in zip(row_counts, seq_counts, strict=True)):
        # equal sequence lengths: the concatenation's sequences, row ids as on one device
        # (``random``'s key is the row's index in the call)
        nseq = sum(s for c, s in zip(row_counts, seq_counts, strict=True) if c)
        r = route_replicas(
            probs, ids, weights, placement, token_rank=rank_of_row, valid=valid, min_tokens=0,
            capacity_scope="sequence", num_sequences=nseq, **kw,
        )  # fmt: skip
        return r.ids, r.weights, r.copy_ids
    outs = []
    for s0, n, nseq in zip(starts(row_counts), row_counts, seq_counts, strict=True):
        if n == 0:
            continue
        sl = slice(s0, s0 + n)
        r = route_replicas(
            probs[sl], ids[sl], weights[sl], placement, token_rank=rank_of_row[sl],
            valid=None if valid is None else valid[sl], min_tokens=0,
            capacity_scope="sequence", num_sequences=max(nseq, 1), **kw,
        )  # fmt: skip
        outs.append(r)
    return tuple(torch.cat([getattr(r, f) for r in outs]) for f in ("ids", "weights", "copy_ids"))


def starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def _pad(ids, weights, opts, info, E):
    """The selection unchanged, in the width ``route_group`` returns for these options."""
    ids = ids.long()
    if opts["capacity_factor"] is None or not widens(opts["policy"]):
        return ids.clone(), weights.clone()
    T = ids.shape[0]
    return (
        torch.cat([ids, ids.new_full((T, info.num_local), E)], 1),
        torch.cat([weights, weights.new_zeros(T, info.num_local)], 1),
    )


def _expanded_drop_ep(P, ids, W, rank_of_row, info, opts, valid, nseq):
    """SPEC's expanded_drop with per-row local experts L(t) = the experts of t's rank.

    Candidates K = S u {(t, e): e in L(t)}; every expert keeps its C candidates of largest P
    (ties: smaller t). That is the ``score`` rule applied to the extended selection K, so
    this calls ``route_reference(policy="score")`` on K with C forced through
    ``min_capacity`` (K has more than k columns, which would change C's formula)."""
    T, E = P.shape
    k = ids.shape[1]
    ids = ids.long()
    G = nseq if opts["capacity_scope"] == "sequence" else 1
    local = rank_of_row[:, None] * info.num_local + torch.arange(info.num_local)  # [T, El]
    dup = (local[:, :, None] == ids[:, None, :]).any(-1)
    scale = token_scale(P, ids, W)
    add_w = (P.float().gather(1, local) * scale[:, None]).to(W.dtype)
    ext_ids = torch.cat([ids, local], 1)
    ext_w = torch.cat([W, add_w], 1)
    R = T // G
    if valid is None:
        C = capacity(R, E, k, opts["capacity_factor"], opts["min_capacity"], opts["capacity_align"])
        caps = [int(C)] * G
    else:
        per = valid.view(G, R).sum(1)
        caps = capacity(
            per, E, k, opts["capacity_factor"], opts["min_capacity"], opts["capacity_align"]
        ).tolist()
    oi_parts, ow_parts = [], []
    for g in range(G):
        sl = slice(g * R, (g + 1) * R)
        oi, ow = route_reference(
            P[sl],
            ext_ids[sl],
            ext_w[sl],
            capacity_factor=1e-9,  # C = min_capacity = the C of the real selection
            policy="score",
            min_tokens=0,
            min_capacity=int(caps[g]),
            valid=None if valid is None else valid[sl],
        )
        oi_parts.append(oi)
        ow_parts.append(ow)
    oi, ow = torch.cat(oi_parts), torch.cat(ow_parts)
    extra_i, extra_w = oi[:, k:], ow[:, k:]
    extra_i = torch.where(dup, torch.full_like(extra_i, E), extra_i)
    extra_w = torch.where(dup, torch.zeros_like(extra_w), extra_w)
    oi = torch.cat([oi[:, :k], extra_i], 1)
    ow = torch.cat([ow[:, :k], extra_w], 1)
    if opts["renormalize"]:
        ow = renormalized(W, ow)
    return oi, ow
