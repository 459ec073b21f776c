"""The static-shaped EP layer: functional collectives inside the compiled graph.

With capacity on, receiver-side (global) selection bounds every (source rank, expert) buffer:
expert ``e`` keeps at most ``C`` pairs of the whole group, so source ``s`` sends it at most
``min(C, T_s)`` rows, and at most ``T_s * min(k', E_local)`` rows to one destination rank
(a token pairs with an expert at most once). With the ranks' token counts ``T_s`` known when
the graph is compiled, every all-to-all split is a compile-time constant and the layer is plain
traceable torch code: :func:`ep_moe_static` is inserted by the passes as a ``call_function``,
AOTAutograd traces it, and Inductor sees ``_c10d_functional.all_gather_into_tensor`` /
``all_to_all_single`` / ``wait_tensor`` next to the routing and the expert GEMMs.

Per call (``W`` ranks, this rank ``r`` with ``T_r`` rows, ``E_l = E / W`` local experts):

1. ``all_gather_tensor`` of a 2-int header ``[T_r, fingerprint]`` and ``capmoe::ep_static_check``
   (a small opaque op): every rank raises the same ``RuntimeError`` when the ranks disagree on
   the configuration, when a rank's token count is not the one the graph was compiled for, or
   when the options in force are not the ones the graph baked in (``C``, policy, ...).
2. ``all_gather_tensor`` of the routing metadata ``[T_r, E + 2k]`` (padded to ``max T_s``).
3. The capacity policy on the group's rows (``route_group``, traced, identical on every rank).
4. Every rank computes, for every kept (token, expert) pair of the group, its destination rank
   and its position inside its (source, destination) chunk (pair order). Chunk sizes are the
   static bounds ``S_s = min(E_l * min(C, T_s), T_s * min(k', E_l))``.
5. ``all_to_all_single`` of ``[W * S_r, H]`` rows (padding rows are zeros), the receiver runs
   ``lowering.grouped.moe_experts_grouped`` on the received rows with their local expert ids
   (padding rows carry the sentinel id and cost no GEMM time), ``all_to_all_single`` back, and
   the weighted combine as a gather on the token's rank.

Bytes: rank ``r`` sends ``W * S_r * H`` elements per direction against the real rows only
(``sum`` of its kept pairs to other ranks) of the opaque op's uneven splits. With equal
``T_s = T / W`` and ``gamma >= 1``, ``S_r = T_r * min(k', E_l)``: up to ``W`` times the mean
real traffic (a source could send all its pairs to one rank, and the split must allow it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .. import pipeline
from ..lowering import grouped
from ..routing import capacity, widens
from . import group as ep_group
from .group import route_group, starts


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """Everything the static layer bakes in when the graph is compiled."""

    layer: int  # pipeline layer handle (options)
    key: int  # EP layer (distributed.group)
    name: str
    counts: tuple[int, ...]  # T_s of every rank
    capacity: int  # C over the group's T
    width: int  # k' of the routed selection
    chunks: tuple[int, ...]  # S_s: rows per (source s, destination) chunk
    fingerprint: int  # options + layer + form + counts: the run-time header
    opts_fingerprint: int  # the options the graph was compiled for
    opts: Any  # the options dict (compile time)
    form: str
    group: Any


_PLANS: list[StaticPlan] = []


def plans() -> list[StaticPlan]:
    return list(_PLANS)


def _group(info):
    return info.group if info.group is not None else dist.group.WORLD


def _header_exchange(info, T: int, fp: int) -> torch.Tensor:
    """``[W, 2]`` int64: every rank's ``[T_r, fingerprint]`` (eager or traced alike)."""
    header = torch.tensor([[T, fp]], dtype=torch.int64)
    return fc.all_gather_tensor(header, 0, _group(info))


def why_not_static(opts: dict, mask_used: bool, dtype: torch.dtype, form) -> str:
    """Why a layer keeps the opaque op ("" when the static path applies)."""
    if opts["capacity_factor"] is None:
        return "capacity off: per-(source, expert) loads are unbounded (data-dependent splits)"
    if opts["capacity_scope"] != "batch":
        return "capacity_scope='sequence' is routed by the opaque op"
    if mask_used:
        return "padding excluded through the attention mask (data-dependent T)"
    if not grouped.supports(form, dtype):
        return f"no grouped expert kernel for this form/dtype ({dtype})"
    return ""


def make_plan(layer: int, key: int, T: int, k: int, opts: dict, form_str: str) -> StaticPlan | str:
    """The static plan of EP layer ``key`` (a collective: every rank calls it while compiling),
    or the reason it cannot be static."""
    ep = ep_group.get(key)
    info = ep.info
    fp_opts = ep_group.options_fingerprint(opts)
    # The same eager header all-gather the opaque op makes: ranks that compiled with other
    # options raise here, at compile time, on every rank.
    head = torch.tensor([T, ep_group.fingerprint([ep.name, form_str, fp_opts, "static"]), 1, 0])
    got = ep_group.check_agreement(info, head, f"layer {ep.name}")
    counts = tuple(int(c) for c in got[:, 0].tolist())
    total = sum(counts)
    if total < opts["min_tokens"]:
        return f"the group's T={total} is below min_tokens (capacity off for this shape)"
    E, El = info.num_experts, info.num_local
    C = int(
        capacity(
            total,
            E,
            k,
            opts["capacity_factor"],
            opts["min_capacity"],
            opts["capacity_align"],
        )
    )
    width = k + El if widens(opts["policy"]) else k
    chunks = tuple(min(El * min(C, c), c * min(width, El)) for c in counts)
    fp = ep_group.fingerprint([ep.name, form_str, fp_opts, counts, "static"])
    plan = StaticPlan(
        layer, key, ep.name, counts, C, width, chunks, fp, fp_opts, dict(opts), form_str, info.group
    )
    _PLANS.append(plan)
    return plan


@torch.library.custom_op("capmoe::ep_static_check", mutates_args=())
def ep_static_check(header: torch.Tensor, plan: int) -> torch.Tensor:
    """Raise on every rank if the group's headers do not match what plan ``plan`` baked in;
    returns a zero that later steps depend on (so this runs before any other collective)."""
    pl = _PLANS[plan]
    fps = header[:, 1].tolist()
    if len(set(fps)) != 1:
        raise RuntimeError(
            f"capmoe EP: ranks disagree on the configuration of layer {pl.name} (fingerprints "
            f"by rank: {fps}); every rank must compile the same model with the same capmoe "
            "options and the same token counts"
        )
    counts = tuple(int(c) for c in header[:, 0].tolist())
    fp_now = ep_group.options_fingerprint(pipeline.layer(pl.layer).options())
    if counts != pl.counts or fp_now != pl.opts_fingerprint:
        what = (
            f"token counts per rank {list(counts)} (compiled for {list(pl.counts)})"
            if counts != pl.counts
            else "options (capacity factor, policy, ...) changed since compile"
        )
        raise RuntimeError(
            f"capmoe EP: layer {pl.name} was compiled with a static all-to-all for its "
            f"capacity C={pl.capacity} and the ranks' token counts; now: {what}. Call "
            "torch._dynamo.reset() on every rank and run again, or shard with "
            "expert_parallel(model, dispatch='opaque') for options or per-rank batch sizes "
            "that change between calls"
        )
    return header.new_zeros(1)


@ep_static_check.register_fake
def _ep_static_check_fake(header, plan):
    return header.new_empty(1)


@torch.library.custom_op("capmoe::ep_observe", mutates_args=())
def ep_observe(ids: torch.Tensor, routed: torch.Tensor, plan: int) -> torch.Tensor:
    """Telemetry of the group's routing (when ``record_stats`` is on); returns ``routed``."""
    from .. import telemetry

    if telemetry.is_recording():
        pl = _PLANS[plan]
        E = ep_group.get(pl.key).info.num_experts
        telemetry.record(pl.name, ids, routed, E, pl.opts, None, 1)
    return routed.clone()


@ep_observe.register_fake
def _ep_observe_fake(ids, routed, plan):
    return torch.empty_like(routed)


def ep_moe_static(
    x: torch.Tensor,
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    plan: int,
) -> torch.Tensor:
    """A rewritten EP layer with static shapes (module docstring). Traceable torch code."""
    pl = _PLANS[plan]
    info = ep_group.get(pl.key).info
    grp = _group(info)
    W, r = info.world, info.rank
    counts, S = pl.counts, pl.chunks
    Tr, H = x.shape
    kp = pl.width
    off = sum(counts[:r])

    # 1. header + checks; 2. the group's routing metadata; 3. the policy on the group's rows
    zero = ep_static_check(_header_exchange(info, Tr, pl.fingerprint), plan)
    gP, g_ids, gW, rank_of_row = _gather_routing(probs, ids, weights, zero, pl, info)
    g_out_i, g_out_w = route_group(
        gP, g_ids, gW, rank_of_row, info, pl.opts, list(counts), [1] * W, None
    )
    g_out_i = ep_observe(g_ids, g_out_i, plan)

    # 4. destination and position inside its (source, destination) chunk of every kept pair
    fe, kept, dest, q, src = _chunk_positions(g_out_i, rank_of_row, pl, info)

    # 5. dispatch: this rank's pairs into W chunks of S[r] rows each
    mine = slice(off * kp, (off + Tr) * kp)
    trash_s = W * S[r]
    send_idx = torch.where(kept[mine], dest[mine].clamp_max(W - 1) * S[r] + q[mine], trash_s)
    slot_pair = torch.full((trash_s + 1,), Tr * kp, dtype=torch.long, device=x.device)
    slot_pair = slot_pair.index_put((send_idx,), torch.arange(Tr * kp, device=x.device))
    tok = torch.cat(
        [torch.arange(Tr * kp, device=x.device) // kp, torch.full((1,), Tr, device=x.device)]
    )
    x_pad = torch.cat([x, x.new_zeros(1, H)])
    send = x_pad[tok[slot_pair[:trash_s]]]
    recv = fc.all_to_all_single(send, [S[s] for s in range(W)], [S[r]] * W, grp)
    recv_eid = _received_expert_ids(fe, kept, dest, q, src, pl, info)
    y = ep_group.apply_local_experts(recv, recv_eid, params, pl.form)

    # 6. back to the tokens' ranks, weighted combine (a gather, dropped pairs read zeros)
    back = fc.all_to_all_single(y, [S[r]] * W, [S[s] for s in range(W)], grp)
    back_pad = torch.cat([back, back.new_zeros(1, H)])
    rows = back_pad[send_idx].view(Tr, kp, H).float()
    w_mine = g_out_w[off : off + Tr].float()
    return (rows * w_mine[:, :, None]).sum(1).to(x.dtype)


def _gather_routing(probs, ids, weights, zero, pl: StaticPlan, info):
    """The group's ``(P, S, W)`` in rank order (exact in float64 for any float dtype), and
    the rank of every row. ``zero`` (the check's result) orders this after the check."""
    counts, E, k = pl.counts, info.num_experts, ids.shape[1]
    packed = torch.cat([probs.double(), ids.double(), weights.double()], 1) + zero.double()
    Tmax = max(counts)
    if Tmax > ids.shape[0]:
        packed = torch.nn.functional.pad(packed, (0, 0, 0, Tmax - ids.shape[0]))
    gathered = fc.all_gather_tensor(packed, 0, _group(info))
    g = torch.cat([gathered[s * Tmax : s * Tmax + c] for s, c in enumerate(counts)])
    rank_of_row = torch.cat(
        [torch.full((c,), s, dtype=torch.long, device=ids.device) for s, c in enumerate(counts)]
    )
    gP = g[:, :E].to(probs.dtype)
    return gP, g[:, E : E + k].long(), g[:, E + k : E + 2 * k].to(weights.dtype), rank_of_row


def _chunk_positions(g_out_i, rank_of_row, pl: StaticPlan, info):
    """For every (row, slot) pair of the group: its expert ``fe``, whether it is kept, its
    destination rank (``W`` when dropped), its position ``q`` in its (source, destination)
    chunk, and its source rank."""
    W, E, El, kp = info.world, info.num_experts, info.num_local, pl.width
    fe = g_out_i.reshape(-1)  # [T * k'], rows in rank order
    kept = fe < E
    dest = torch.where(kept, torch.div(fe, El, rounding_mode="floor"), W)
    csum = torch.nn.functional.one_hot(dest, W + 1)[:, :W].cumsum(0)  # pairs per destination
    zeros_w = torch.zeros(1, W, dtype=csum.dtype, device=fe.device)
    base = torch.cat(
        [zeros_w] + [csum[o * kp - 1 : o * kp] if o > 0 else zeros_w for o in starts(pl.counts)[1:]]
    )  # [W, W]: pairs per destination before each source's first row
    src = torch.repeat_interleave(rank_of_row, kp)
    q = (csum - 1 - base[src]).gather(1, dest.clamp_max(W - 1)[:, None]).squeeze(1)
    return fe, kept, dest, q, src


def _received_expert_ids(fe, kept, dest, q, src, pl: StaticPlan, info) -> torch.Tensor:
    """The local expert id of every row this rank receives (padding rows: sentinel ``E_l``)."""
    r, El, S = info.rank, info.num_local, pl.chunks
    R = sum(S)
    recv_base = torch.tensor(starts(list(S)), dtype=torch.long, device=fe.device)
    to_me = kept & (dest == r)
    recv_idx = torch.where(to_me, recv_base[src] + q, R)
    local_e = (fe - r * El).clamp(0, El)
    recv_eid = torch.full((R + 1,), El, dtype=torch.long, device=fe.device)
    return recv_eid.index_put((recv_idx,), torch.where(to_me, local_e, El))[:R]
