"""Redundant expert copies: SPEC.md's "Redundant expert copies", the eager reference.

A :class:`Placement` maps ``E' = E + R`` physical copies to logical experts and ranks.
:func:`route_replicas` sends every selected pair to a copy of its expert (round robin by pair
order, or by the plan's shares) and applies the capacity policy per copy, with
``C = ceil(gamma * T * k / (E + R))``. It is built on :mod:`capmoe_compile.routing`: the pair
policies rank through ``routing._keep_pairs`` on the physical ``[T, E']`` problem with the
policy's key of the *logical* pair; ``expanded_drop`` and ``reroute`` are redone here on copies
(a token must never get two copies of one logical expert). With the identity placement
(``R = 0``) the result equals :func:`capmoe_compile.route` bit for bit
(``tests/test_replicas.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import routing
from .routing import get_policy, renormalized, token_scale

SPLITS = ("round_robin", "share")


@dataclasses.dataclass(frozen=True)
class Placement:
    """One layer's copies: ``expert_of[p]`` and ``rank_of[p]`` for physical copy ``p``.

    ``shares`` (optional, one float per copy) is the fraction of its logical expert's pairs a
    copy takes under ``split="share"``; they sum to 1 over each expert's copies."""

    num_experts: int
    expert_of: tuple[int, ...]
    rank_of: tuple[int, ...]
    shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        E = self.num_experts
        if len(self.expert_of) != len(self.rank_of):
            raise ValueError("expert_of and rank_of must have one entry per copy")
        if any(not 0 <= e < E for e in self.expert_of):
            raise ValueError(f"expert_of holds ids outside [0, {E})")
        missing = set(range(E)) - set(self.expert_of)
        if missing:
            raise ValueError(f"experts without a copy: {sorted(missing)}")
        if any(r < 0 for r in self.rank_of):
            raise ValueError("rank_of must be >= 0")
        if self.shares is not None:
            if len(self.shares) != len(self.expert_of) or any(s < 0 for s in self.shares):
                raise ValueError("shares: one non-negative float per copy")
            for e in range(E):
                tot = sum(s for s, x in zip(self.shares, self.expert_of, strict=True) if x == e)
                if abs(tot - 1.0) > 1e-6:
                    raise ValueError(f"shares of expert {e}'s copies sum to {tot}, not 1")

    @classmethod
    def identity(cls, num_experts: int, num_ranks: int = 1) -> Placement:
        """``R = 0``: copy ``p`` is expert ``p``, ranks hold ``E / N`` contiguous experts."""
        per = -(-num_experts // num_ranks)
        return cls(
            num_experts, tuple(range(num_experts)), tuple(p // per for p in range(num_experts))
        )

    @classmethod
    def from_copies(cls, num_experts: int, ranks: Sequence[Sequence[int]], shares=None):
        """From the logical experts each rank holds (``ranks[r]`` = its copies, in slot order);
        copies are numbered rank by rank. ``shares``, if given, has the same nesting."""
        expert_of = tuple(int(e) for r in ranks for e in r)
        rank_of = tuple(r for r, held in enumerate(ranks) for _ in held)
        flat = None if shares is None else tuple(float(s) for r in shares for s in r)
        return cls(num_experts, expert_of, rank_of, flat)

    @property
    def num_copies(self) -> int:
        return len(self.expert_of)

    @property
    def redundant(self) -> int:
        return self.num_copies - self.num_experts

    @property
    def num_ranks(self) -> int:
        return max(self.rank_of) + 1

    def copies(self, expert: int) -> list[int]:
        return [p for p, e in enumerate(self.expert_of) if e == expert]

    def to_dict(self) -> dict:
        out = {
            "num_experts": self.num_experts,
            "expert_of": list(self.expert_of),
            "rank_of": list(self.rank_of),
        }
        if self.shares is not None:
            out["shares"] = list(self.shares)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        shares = d.get("shares")
        return cls(
            int(d["num_experts"]),
            tuple(int(x) for x in d["expert_of"]),
            tuple(int(x) for x in d["rank_of"]),
            None if shares is None else tuple(float(s) for s in shares),
        )


@dataclasses.dataclass
class Routed:
    """:func:`route_replicas`'s result: ``ids`` (logical, sentinel ``E``), ``weights``, and
    ``copy_ids`` (physical, sentinel ``E'``), all ``[T, k']``."""

    ids: torch.Tensor
    weights: torch.Tensor
    copy_ids: torch.Tensor


def _tables(placement: Placement, device):
    E, Ep = placement.num_experts, placement.num_copies
    expert_of = torch.tensor(placement.expert_of, dtype=torch.int64, device=device)
    n = torch.bincount(expert_of, minlength=E)  # copies per expert
    table = torch.full((E, int(n.max())), Ep, dtype=torch.int64, device=device)
    for e in range(E):
        c = placement.copies(e)
        table[e, : len(c)] = torch.tensor(c, dtype=torch.int64, device=device)
    return expert_of, n, table


def _first_slots(ids: torch.Tensor) -> torch.Tensor:
    """[T, k]: slot j holds an expert no earlier slot of its row holds."""
    k = ids.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=ids.device).triu(1)
    return ~((ids[:, :, None] == ids[:, None, :]) & later).any(1)


def assign_copies(
    ids: torch.Tensor,
    placement: Placement,
    *,
    split: str = "round_robin",
    rows_valid: torch.Tensor | None = None,
    num_groups: int = 1,
    pad_sentinel: bool = True,
) -> torch.Tensor:
    """SPEC's copy of each selected pair: ``[T, k]`` copy ids. Padding rows (``rows_valid``
    False) count in no expert's pair order; they get ``E'`` (or, with ``pad_sentinel`` False,
    their expert's first copy: where they go when capacity is off and padding runs)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    T, k = ids.shape
    E, Ep = placement.num_experts, placement.num_copies
    dev = ids.device
    _, n, table = _tables(placement, dev)
    G = num_groups
    first = _first_slots(ids)
    member = first if rows_valid is None else first & rows_valid[:, None]
    # j: position of each pair among its expert's pairs in its group, in pair order
    onehot = torch.zeros(T * k, E, dtype=torch.int64, device=dev)
    onehot.scatter_(1, ids.reshape(-1, 1), member.reshape(-1, 1).long())
    per_group = onehot.view(G, (T // G) * k, E)
    csum = per_group.cumsum(1)
    j = (csum - per_group).view(T * k, E).gather(1, ids.reshape(-1, 1)).view(T, k)
    if split == "round_robin":
        idx = j % n[ids]
    else:
        if placement.shares is None:
            raise ValueError("split='share' needs a placement with shares")
        share = torch.zeros(table.shape, dtype=torch.float64, device=dev)
        for e in range(E):
            for i, p in enumerate(placement.copies(e)):
                share[e, i] = placement.shares[p]
        cum = share.cumsum(1)  # [E, maxn]
        N = csum[:, -1, :]  # [G, E] pairs of each expert in each group
        bounds = torch.floor(N[:, :, None].double() * cum[None] + 0.5).long()  # [G, E, maxn]
        bounds[:, :, -1] = N  # the last copy of a row of the table closes it
        bounds = torch.where(table[None] < Ep, bounds, N[:, :, None])
        g_of = torch.arange(T, device=dev).div(T // G, rounding_mode="floor")
        b = bounds[g_of[:, None].expand(T, k), ids]  # [T, k, maxn]
        idx = (b <= j[:, :, None]).sum(-1).clamp_max(n[ids] - 1)
    cid = table[ids, idx]
    # a repeated expert goes where its first slot went
    same = (ids[:, :, None] == ids[:, None, :]) & first[:, None, :]  # [T, k(slot), k(first)]
    src = same.float().argmax(-1)
    cid = cid.gather(1, src)
    if rows_valid is not None:
        cid = torch.where(rows_valid[:, None], cid, Ep if pad_sentinel else table[ids, 0])
    return cid


def _logical_key_policy(pol, probs, ids, expert_of, seed):
    """The policy as a ``routing.Policy`` over copies: its key of the logical pair."""
    pair = pol.pair_key(probs, ids, seed)
    dense = pol.dense_key(probs, seed)[:, expert_of]
    return routing.Policy(pol.name, pol.doc, lambda *a: pair, lambda *a: dense)


def route_replicas(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: Placement | None = None,
    *,
    capacity_factor: float | None,
    policy: str = "score",
    split: str = "round_robin",
    local_copies: Sequence[int] | None = None,
    token_rank: torch.Tensor | None = None,
    renormalize: bool = False,
    reroute_rounds: int = 1,
    seed: int = 0,
    min_tokens: int = 0,
    min_capacity: int = 1,
    capacity_align: int = 1,
    capacity_scope: str = "batch",
    num_sequences: int = 1,
    valid: torch.Tensor | None = None,
) -> Routed:
    """SPEC.md's "Redundant expert copies". ``placement`` None is the identity (``R = 0``).

    ``local_copies`` (one device) or ``token_rank`` [T] (the rank holding each token, under
    expert parallelism: ``L(t)`` = the copies on that rank) give ``expanded_drop``'s local
    copies; neither: every copy is local. Other arguments as :func:`capmoe_compile.route`."""
    routing._check(probs, topk_ids, topk_weights, policy, capacity_scope, num_sequences, valid)
    T, E = probs.shape
    k = topk_ids.shape[1]
    placement = placement or Placement.identity(E)
    if placement.num_experts != E:
        raise ValueError(f"placement is for E={placement.num_experts}, probs have E={E}")
    Ep = placement.num_copies
    dev = probs.device
    ids = topk_ids.long()
    expert_of = torch.tensor(placement.expert_of, dtype=torch.int64, device=dev)
    pol = get_policy(policy)
    G = num_sequences if capacity_scope == "sequence" else 1
    if T % G:
        raise ValueError(f"T={T} rows do not split into num_sequences={G} equal sequences")
    rows_valid = None if valid is None else valid.bool()
    cid = assign_copies(
        ids, placement, split=split, rows_valid=rows_valid, num_groups=G, pad_sentinel=False
    )
    if capacity_factor is None:
        return Routed(ids.clone(), topk_weights.clone(), cid)
    width = _width(pol, k, E, placement, local_copies, token_rank)
    if T == 0 or (valid is None and T < min_tokens):
        return _unchanged(ids, topk_weights, cid, width, E, Ep)

    cap_g = routing._group_capacity(
        rows_valid, T, G, Ep, k, capacity_factor, min_capacity, capacity_align, dev
    )
    Pp = probs[:, expert_of]  # [T, E']: a copy ranks by its logical expert's P
    if pol.candidates is None:
        phys = _logical_key_policy(pol, probs, ids, expert_of, seed)
        kept_slot, _ = routing._keep_pairs(phys, Pp, cid, rows_valid, cap_g, G, seed)
        out_ids = torch.where(kept_slot, ids, E)
        out_cid = torch.where(kept_slot, cid, Ep)
        out_w = torch.where(kept_slot, topk_weights, torch.zeros_like(topk_weights))
        if pol.after is not None and pol.copy_form == "proposal_rounds":
            out_ids, out_cid, out_w = _reroute(
                probs, ids, topk_weights, cid, kept_slot, rows_valid, cap_g, G,
                placement, reroute_rounds,
            )  # fmt: skip
        elif pol.after is not None:
            raise NotImplementedError(f"policy {policy!r}: its after step has no copy form")
    elif pol.copy_form == "local_expansion":
        rows = routing._every_row(rows_valid, T, probs)
        out_ids, out_cid, out_w = _expanded(
            probs, ids, topk_weights, cid, rows, cap_g, G, placement, local_copies,
            token_rank, width,
        )  # fmt: skip
    else:
        raise NotImplementedError(f"policy {policy!r}: its candidates have no copy form")

    if renormalize:
        out_w = renormalized(topk_weights, out_w)
    if valid is not None and min_tokens > 0:
        small = rows_valid.sum() < min_tokens
        same = _unchanged(ids, topk_weights, cid, width, E, Ep)
        out_ids = torch.where(small, same.ids, out_ids)
        out_w = torch.where(small, same.weights, out_w)
        out_cid = torch.where(small, same.copy_ids, out_cid)
    return Routed(out_ids, out_w, out_cid)


def _local_mask(placement, local_copies, token_rank, T, device) -> torch.Tensor:
    """[T, E'] (or [1, E']): copy p is local to token t."""
    Ep = placement.num_copies
    if token_rank is not None:
        rank_of = torch.tensor(placement.rank_of, dtype=torch.int64, device=device)
        return token_rank.long().view(T, 1).to(device) == rank_of.view(1, Ep)
    local = torch.zeros(1, Ep, dtype=torch.bool, device=device)
    if local_copies is None:
        local[:] = True
    else:
        local[0, list(local_copies)] = True
    return local


def _width(pol, k, E, placement, local_copies, token_rank) -> int:
    if pol.candidates is None:
        return k
    if token_rank is not None:
        per_rank: dict[int, set[int]] = {}
        for e, r in zip(placement.expert_of, placement.rank_of, strict=True):
            per_rank.setdefault(r, set()).add(e)
        m = max(len(s) for s in per_rank.values())
    elif local_copies is None:
        m = E
    else:
        m = len({placement.expert_of[p] for p in local_copies})
    return k + min(m, E - k)


def _unchanged(ids, weights, cid, width, E, Ep) -> Routed:
    T, k = ids.shape
    if width == k:
        return Routed(ids.clone(), weights.clone(), cid.clone())
    return Routed(
        torch.cat([ids, ids.new_full((T, width - k), E)], 1),
        torch.cat([weights, weights.new_zeros(T, width - k)], 1),
        torch.cat([cid, cid.new_full((T, width - k), Ep)], 1),
    )


def _expanded(probs, ids, W, cid, rows_valid, cap_g, G, placement, local_copies, token_rank, width):
    """SPEC's expanded_drop on copies (routing._expanded_drop's steps, on ``[T, E']``)."""
    T, E = probs.shape
    k = ids.shape[1]
    Ep = placement.num_copies
    dev = probs.device
    expert_of = torch.tensor(placement.expert_of, dtype=torch.int64, device=dev)
    P = probs.float()
    Pp = P[:, expert_of]
    sel_e = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, ids, True)
    sel_e &= rows_valid[:, None]
    sel = torch.zeros(T, Ep + 1, dtype=torch.bool, device=dev).scatter_(1, cid, True)[:, :Ep]
    sel &= rows_valid[:, None]
    local = _local_mask(placement, local_copies, token_rank, T, dev).expand(T, Ep)
    # the smallest local copy of each logical expert, per token
    pos = torch.arange(Ep, device=dev).expand(T, Ep)
    big = torch.full((T, E), Ep, dtype=torch.int64, device=dev)
    first_local = big.scatter_reduce(
        1, expert_of.expand(T, Ep), torch.where(local, pos, Ep), reduce="amin"
    )
    is_first = local & (first_local.gather(1, expert_of.expand(T, Ep)) == pos)
    add = is_first & ~sel_e[:, expert_of] & rows_valid[:, None]
    cand = sel | add
    view = (G, T // G, Ep)
    keep = cand & (routing._rank_rows(Pp.view(view), cand.view(view)) < cap_g).reshape(T, Ep)
    kept_slot = keep.gather(1, cid.clamp_max(Ep - 1)) & (cid < Ep)
    out_ids = torch.where(kept_slot, ids, torch.full_like(ids, E))
    out_cid = torch.where(kept_slot, cid, torch.full_like(cid, Ep))
    out_w = torch.where(kept_slot, W, torch.zeros_like(W))
    scale = token_scale(probs, ids, W)
    n_extra = width - k
    added = keep & ~sel  # at most one copy per logical expert (``add`` picks one)
    added_e = (
        torch.zeros(T, E, dtype=torch.int64, device=dev).scatter_add_(
            1, expert_of.expand(T, Ep), added.long()
        )
        > 0
    )
    copy_e = torch.full((T, E), Ep, dtype=torch.int64, device=dev).scatter_reduce(
        1, expert_of.expand(T, Ep), torch.where(added, pos, Ep), reduce="amin"
    )
    e_ids = torch.arange(E, device=dev).expand(T, E)
    extra = torch.where(added_e, e_ids, torch.full_like(e_ids, E)).sort(-1).values[:, :n_extra]
    got = extra < E
    pe = P.gather(1, extra.clamp_max(E - 1)) * scale[:, None]
    extra_c = torch.where(got, copy_e.gather(1, extra.clamp_max(E - 1)), Ep)
    out_ids = torch.cat([out_ids, extra], 1)
    out_cid = torch.cat([out_cid, extra_c], 1)
    out_w = torch.cat([out_w, torch.where(got, pe, 0.0).to(out_w.dtype)], 1)
    return out_ids, out_cid, out_w


def _reroute(probs, ids, W, cid, kept_slot, rows_valid, cap_g, G, placement, rounds):
    """SPEC's reroute on copies: ``score`` per copy (``kept_slot``), then proposal rounds to
    logical experts, each at its available copy with the most spare capacity."""
    T, E = probs.shape
    k = ids.shape[1]
    Ep = placement.num_copies
    dev = probs.device
    expert_of = torch.tensor(placement.expert_of, dtype=torch.int64, device=dev)
    P = probs.float()
    rows = routing._every_row(rows_valid, T, probs)
    out_ids = torch.where(kept_slot, ids, E)
    out_cid = torch.where(kept_slot, cid, Ep)
    out_w = torch.where(kept_slot, W, torch.zeros_like(W))
    if rounds <= 0:
        return out_ids, out_cid, out_w
    scale = token_scale(probs, ids, W)
    first = _first_slots(ids) & rows[:, None]
    R = T // G
    g_of = torch.arange(T, device=dev) // R
    # assigned logical experts; kept pairs per copy
    assigned = torch.zeros(T, E + 1, dtype=torch.bool, device=dev)
    assigned.scatter_(1, torch.where(kept_slot & first, ids, E), True)
    assigned = assigned[:, :E]
    load = torch.zeros(G, Ep + 1, dtype=torch.int64, device=dev)
    load.index_put_((g_of[:, None].expand(T, k), torch.where(kept_slot & first, cid, Ep)),
                    torch.ones(T, k, dtype=torch.int64, device=dev), accumulate=True)  # fmt: skip
    spare = (cap_g.view(G, 1) - load[:, :Ep]).clamp_min(0)  # [G, E']
    want = (first & ~kept_slot).sum(-1)
    proposed = torch.zeros(T, Ep, dtype=torch.bool, device=dev)
    # the dropped pairs' own copies are full (spare 0) and stay full
    pos = torch.arange(Ep, device=dev)
    e_col = torch.arange(E, device=dev)
    for _ in range(rounds):
        sp = spare[g_of]  # [T, E']
        avail = (sp > 0) & ~assigned[:, expert_of] & ~proposed
        # per (t, e): the available copy with most spare, ties smaller p
        code = torch.where(avail, sp * (Ep + 1) + (Ep - pos), -1)  # larger is better
        best = torch.full((T, E), -1, dtype=torch.int64, device=dev).scatter_reduce(
            1, expert_of.expand(T, Ep), code, reduce="amax"
        )
        has = best >= 0
        best_copy = torch.where(has, Ep - best % (Ep + 1), Ep)  # [T, E]
        # preference over logical experts: P desc, ties smaller e (stable sort)
        pref = torch.sort(P.masked_fill(~has, float("-inf")), dim=-1, descending=True, stable=True)
        prank = torch.empty_like(pref.indices).scatter_(1, pref.indices, e_col.expand(T, E))
        propose_e = has & (prank < want[:, None]) & rows[:, None]  # [T, E]
        prop = torch.zeros(T, Ep + 1, dtype=torch.bool, device=dev)
        prop.scatter_(1, torch.where(propose_e, best_copy, Ep), True)
        prop = prop[:, :Ep]  # [T, E'] one copy per proposed expert
        proposed |= prop
        view = (G, R, Ep)
        accept = prop & (
            routing._rank_rows(P[:, expert_of].view(view), prop.view(view)) < spare.view(G, 1, Ep)
        ).reshape(T, Ep)
        spare = spare - accept.view(view).sum(1)
        acc_e = (
            torch.zeros(T, E, dtype=torch.int64, device=dev).scatter_add_(
                1, expert_of.expand(T, Ep), accept.long()
            )
            > 0
        )
        acc_c = torch.full((T, E), Ep, dtype=torch.int64, device=dev).scatter_reduce(
            1, expert_of.expand(T, Ep), torch.where(accept, pos, Ep), reduce="amin"
        )
        assigned |= acc_e
        n_acc = acc_e.sum(-1)
        want = want - n_acc
        key = torch.where(acc_e, prank, torch.full_like(prank, E))
        order = key.sort(dim=-1, stable=True).indices  # accepted experts by preference
        hole = out_ids == E
        nth = hole.long().cumsum(-1) - 1
        fill = hole & (nth < n_acc[:, None])
        new_e = order.gather(1, nth.clamp(0, E - 1))
        out_ids = torch.where(fill, new_e, out_ids)
        out_cid = torch.where(fill, acc_c.gather(1, new_e), out_cid)
        new_w = (P.gather(1, new_e) * scale[:, None]).to(out_w.dtype)
        out_w = torch.where(fill, new_w, out_w)
    return out_ids, out_cid, out_w
