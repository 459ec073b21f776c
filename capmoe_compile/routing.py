"""The eager reference of SPEC.md: capacity and the six capacity policies.

Everything here is vectorised torch code over a dense ``[G, R, E]`` view of the routing
problem (``G`` capacity groups of ``R`` rows each: one group for ``capacity_scope="batch"``,
one per sequence for ``"sequence"``). The one primitive is :func:`_rank_rows`: the rank of
every row within its expert column by a key, ties to the smaller row. Each policy is a choice
of key plus, for ``reroute``, a few parallel proposal rounds.

This module is the single source of the semantics. Fast paths are tested against it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

SCOPES = ("batch", "sequence")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A capacity policy: which pairs an expert past its capacity keeps (SPEC.md).

    A *pair* policy ranks the selected pairs of each expert by a key and keeps the ``C`` with
    the largest keys: ``pair_key(probs [T, E], ids [T, k], seed) -> [T, k]`` ranks the pairs,
    ``dense_key(probs, seed) -> [T, E]`` the same key for every (row, expert) cell (the dense
    ranking used at small sizes; both must agree on the selected cells). ``after`` runs on the
    kept pairs (``reroute``'s proposal rounds). A *candidate* policy (``candidates``) chooses
    among more pairs than the selection (``expanded_drop``: every local expert of every row)
    and may give a token more than ``k`` experts: ``width`` says how many.

    Register a new one with :func:`register_policy`; ``docs/extending.md`` has the recipe."""

    name: str
    doc: str
    pair_key: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    dense_key: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    after: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    candidates: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    width: Callable[[int, int, Sequence[int] | None], int] | None = None

    def __post_init__(self) -> None:
        pair = self.pair_key is not None and self.dense_key is not None
        if pair == (self.candidates is not None):
            raise ValueError(
                f"policy {self.name!r}: give pair_key and dense_key (a pair policy) or "
                "candidates (a candidate policy), not both"
            )

    def output_width(self, top_k: int, num_experts: int, local_experts=None) -> int:
        return top_k if self.width is None else self.width(top_k, num_experts, local_experts)


_REGISTRY: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    """Add ``policy`` to the policies ``config.policy`` accepts (by its name)."""
    if policy.name in _REGISTRY:
        raise ValueError(f"a policy named {policy.name!r} is already registered")
    _REGISTRY[policy.name] = policy
    return policy


def policy_names() -> tuple[str, ...]:
    """The registered policies, in registration order."""
    return tuple(_REGISTRY)


def get_policy(name: str) -> Policy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy={name!r}: expected one of {', '.join(_REGISTRY)}") from None


@functools.lru_cache(maxsize=64)
def _gamma_fraction(capacity_factor: float) -> Fraction:
    # gamma is read as the decimal number the user wrote: 1.1 is 11/10 exactly, so that
    # ceil(1.1 * 10 * 2 / 2) is 11 and not 12 through binary rounding.
    return Fraction(repr(float(capacity_factor)))


def capacity(
    num_tokens,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 1,
    capacity_align: int = 1,
):
    """``C = max(1, min_capacity, ceil(gamma * T * k / E))`` rounded up to ``capacity_align``.

    Exact integer arithmetic, so ``num_tokens`` may be an int, a SymInt (dynamic shapes) or an
    integer tensor (token counts known only at run time, e.g. with padding excluded).
    """
    g = _gamma_fraction(capacity_factor)
    num = num_tokens * (g.numerator * top_k)
    den = g.denominator * num_experts
    c = (num + (den - 1)) // den
    floor = max(1, int(min_capacity))
    if isinstance(c, torch.Tensor):
        c = c.clamp_min(floor)
    else:
        c = torch.sym_max(c, floor) if isinstance(c, torch.SymInt) else max(c, floor)
    a = int(capacity_align)
    if a > 1:
        c = (c + (a - 1)) // a * a
    return c


def _rank_rows(key: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Rank of each row of ``key`` [G, R, E] within its (group, expert) column.

    Members sort first, by ``key`` descending; ties go to the smaller row index (the sort is
    stable over rows laid out in ascending order). Non-members get ranks after all members.
    """
    if key.is_floating_point():
        key = key.float().masked_fill(~member, float("-inf"))
    else:
        key = key.masked_fill(~member, torch.iinfo(key.dtype).min)
    # Sort each column as a contiguous row of [G, E, R]: 1.9x faster at [1, 2048, 8] and 2.3x
    # at [1, 4096, 64] than sorting along the strided row dim (CPU, one thread).
    key = key.transpose(1, 2).contiguous()
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(key.shape[-1], device=key.device).view(1, 1, -1).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks).transpose(1, 2)


#: Policies whose keep decision is computed per selected pair (:func:`_keep_selected`) instead
#: of over the dense ``[G, R, E]`` view: their candidates are exactly the selection ``S``.


def _descending_u32(key: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) that sorts ascending exactly as ``torch.sort(key, descending=True)``
    orders ``key``: float32 keys through their order-preserving bit pattern (``-0.0`` counted
    as ``0.0`` and every NaN as one NaN above ``+inf``, as ``torch.sort`` treats them); integer
    keys must lie in ``[-2**32 + 2**31, 2**31)`` (token indices and 31-bit hashes do)."""
    if key.is_floating_point():
        f = key.float() + 0.0  # -0.0 -> +0.0
        i = f.view(torch.int32)
        # signed int32 in the float order: a negative float's magnitude bits flipped
        signed = i ^ ((i >> 31) & 0x7FFFFFFF)
        signed = torch.where(f.isnan(), _NAN_SIGNED, signed)  # one NaN, above +inf
        return (2**31 - 1) - signed.to(torch.int64)
    return (2**31 - 1) - key.to(torch.int64)


#: The signed float order of the canonical NaN (bits 0x7FC00000, above +inf's 0x7F800000),
#: and ``_descending_u32(-inf)`` (bits 0xFF800000 -> signed order -0x7F800001).
_NAN_SIGNED = 0x7FC00000
_NEG_INF_CODE = (2**31 - 1) + 0x7F800001


def _concrete_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real data on the CPU, so that reading a value off it (``bool(...)``)
    is cheap and allowed. False on other devices (a host sync) and while the code is traced:
    under fake or functional tensors (AOTAutograd tracing the static EP layer of
    ``distributed/functional.py`` into the graph) reading a value is a data-dependent
    ``aten._local_scalar_dense`` that fails the trace, so the branch-free path is taken."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


#: Pair counts from which :func:`_keep_selected` pads its sort to ATen's radix-sort size.
_RADIX_PAD_FROM, _RADIX_MIN = 20480, 32768


def _keep_selected(
    key: torch.Tensor,
    ids: torch.Tensor,
    rows_valid: torch.Tensor | None,
    cap_g: torch.Tensor | None,
    G: int,
    E: int,
    member: torch.Tensor | None = None,
    cap_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """``keep.gather(1, ids)`` of the dense formulation, computed on the ``T*k`` selected pairs.

    ``member`` [T, k] (None: every pair of a valid row) limits the competing pairs (the other
    pairs are never kept and rank like cells outside the selection); ``cap_seg`` [G * E]
    (None: ``cap_g`` [G, 1, 1] for every expert of a group) is a capacity per (group, expert).

    ``key`` [T, k] is each selected pair's ranking key; ``rows_valid`` [T] (None: every row
    counts) marks the rows that select anything. The dense form ranks every (row,
    expert) cell of ``[G, R, E]`` with :func:`_rank_rows` (a sort of ``T*E`` keys); here only
    the selected pairs are sorted, once, by (group, expert) then key descending then row
    ascending (one stable sort of ``T*k`` int64 codes: segment in the high 32 bits, the key's
    order in the low 32), and a member's rank is its position in its (group, expert) segment.
    That is the dense rank, because there every non-member sorts after every member -- except
    behind a member whose float key is ``-inf``, which non-members of smaller row precede;
    such ranks are corrected by the number of those rows (a second sort, only when such a key
    occurs). A row selecting an expert twice is one member: its two slots sort next to each
    other, the second one is not counted and shares the first one's decision, as ``gather``
    does in the dense form. On concrete CPU tensors without either case (checked after the
    sort), the rank is the position in the segment and the bookkeeping is a few passes.
    """
    T, k = ids.shape
    dev = ids.device
    N = T * k
    if N == 0:
        return torch.zeros(T, k, dtype=torch.bool, device=dev)
    R = T // G
    n_seg = G * E
    if n_seg >= 2**31:
        raise ValueError(f"{G} groups x {E} experts: too many segments for the pair ranking")
    t_idx = torch.arange(T, device=dev).view(-1, 1)
    seg = ids if G == 1 else (t_idx // R) * E + ids
    if rows_valid is not None or member is not None:
        counts_in = torch.ones_like(ids, dtype=torch.bool) if member is None else member
        if rows_valid is not None:
            counts_in = counts_in & rows_valid[:, None]
        seg = torch.where(counts_in, seg, n_seg)
    desc = _descending_u32(key).reshape(-1)
    code = (seg.reshape(-1) << 32) | desc
    if dev.type == "cpu" and _RADIX_PAD_FROM <= N < _RADIX_MIN:
        # ATen sorts a 1-D integer tensor of >= 32768 elements with a radix sort, smaller
        # ones with a merge sort that costs more on unordered codes from ~10-20k elements on
        # (16k random codes: 0.95 ms against 0.60 ms for 32768, one thread; route_reference
        # at T*k = 24576: 0.73-0.83x, at 10240: up to 1.5x slower for the presorted `order`
        # keys): pad with codes above every real one.
        code = torch.cat([code, code.new_full((_RADIX_MIN - N,), (n_seg + 1) << 32)])
    code_s, order = torch.sort(code, stable=True)
    code_s, order = code_s[:N], order[:N]
    seg_s = code_s >> 32
    if cap_seg is None:
        cap_seg = cap_g.reshape(G, 1).expand(G, E).reshape(-1)
    cap = torch.cat([cap_seg.reshape(-1).to(torch.int64), cap_seg.new_zeros(1, dtype=torch.int64)])
    if _concrete_cpu(code_s) and not _needs_general_rank(code_s, order, desc, k, key):
        # No expert twice in a row and no -inf key: a member's rank is its position in its
        # segment, so it is kept iff that position is below its segment's start + capacity
        # (the padding segment n_seg has capacity 0).
        counts = torch.bincount(seg_s, minlength=n_seg + 1)
        limit = counts.cumsum(0) - counts + cap
        keep_s = torch.arange(N, device=dev) < limit[seg_s]
        return torch.empty(N, dtype=torch.bool, device=dev).scatter_(0, order, keep_s).view(T, k)
    row_s = order // k
    dup_s = torch.zeros(N, dtype=torch.bool, device=dev)
    dup_s[1:] = (seg_s[1:] == seg_s[:-1]) & (row_s[1:] == row_s[:-1])
    first_s = (~dup_s).to(torch.int64)
    counts = torch.zeros(n_seg + 1, dtype=torch.int64, device=dev).scatter_add_(0, seg_s, first_s)
    starts = counts.cumsum(0) - counts
    rank_s = first_s.cumsum(0) - 1 - starts[seg_s]  # a duplicate gets its first slot's rank
    if key.is_floating_point():
        neg_inf = (desc == _NEG_INF_CODE)[order] & (seg_s < n_seg)
        if not _concrete_cpu(neg_inf) or bool(neg_inf.any()):
            # rank among the segment's rows in row order (ties of a duplicate: one rank)
            by_row = torch.sort((seg_s << 32) | row_s, stable=True).indices
            row_rank = torch.empty_like(rank_s)
            row_rank[by_row] = first_s[by_row].cumsum(0) - 1 - starts[seg_s[by_row]]
            rank_s = torch.where(neg_inf, rank_s + row_s % R - row_rank, rank_s)
    keep_s = (seg_s < n_seg) & (rank_s < cap[seg_s])
    return torch.empty(N, dtype=torch.bool, device=dev).scatter_(0, order, keep_s).view(T, k)


def _needs_general_rank(code_s, order, desc, k: int, key: torch.Tensor) -> bool:
    """Whether the sorted codes hold a row selecting one expert twice (its two slots carry
    equal codes, next to each other) or a float ``-inf`` key: the cases the plain positional
    rank of :func:`_keep_selected` does not cover. Reads values: concrete CPU tensors only."""
    tie = (code_s[1:] == code_s[:-1]).nonzero().view(-1)  # equal keys on one expert: rare
    if tie.numel() and bool((order[tie] // k == order[tie + 1] // k).any()):
        return True
    return key.is_floating_point() and bool((desc == _NEG_INF_CODE).any())


def _hash_scores(seed: int, rows: int, experts: int, device) -> torch.Tensor:
    """Seeded, device-independent pseudo-random int keys in [0, 2**31) for every (t, e).

    A small integer mixer whose products stay below 2**63, so it is exact on every backend
    and inside compiled graphs (no torch.Generator state to trace).
    """
    t = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    e = torch.arange(experts, device=device, dtype=torch.int64).view(1, -1)
    return _hash_keys(seed, t, e)


def _hash_keys(seed: int, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """:func:`_hash_scores`'s key of each (t, e) given as broadcastable int64 tensors (the
    selected pairs only: ``t`` [T, 1], ``e`` = the ids [T, k])."""
    m = 0x7FFFFFFF
    s = (int(seed) * 0x3C6EF372 + 0x1B873593) & m
    x = ((t + s) & m) * 0x2C1B3C6D + e * 0x297A2D39 + 0x165667B1
    x = x & m
    for mul in (0x5BD1E995, 0x2C1B3C6D):
        x = x ^ (x >> 15)
        x = (x * mul) & m
    return x ^ (x >> 16)


def renormalized(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``after`` (a row's weights once pairs were dropped or added) rescaled to the sum of
    ``before`` (the model's weights of that row); rows left with no weight stay as they are."""
    b = before.float().sum(-1, keepdim=True)
    a = after.float().sum(-1, keepdim=True)
    factor = torch.where(a != 0, b / torch.where(a != 0, a, 1.0), 1.0)
    return (after.float() * factor).to(after.dtype)


def token_scale(probs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SPEC's per-token scale ``W / P`` of the selected pairs, or 1 where they disagree."""
    p = probs.float().gather(1, ids)
    w = weights.float()
    ratio = w / p.clamp_min(torch.finfo(torch.float32).tiny)
    eps = max(torch.finfo(probs.dtype).eps, torch.finfo(weights.dtype).eps)
    tol = max(1e-5, 8 * eps)
    hi, lo = ratio.amax(-1), ratio.amin(-1)
    ok = (p > 0).all(-1) & ((hi - lo) <= tol * hi.abs())
    return torch.where(ok, ratio.mean(-1), torch.ones_like(hi))


def _expanded_width(top_k: int, num_experts: int, local_experts: Sequence[int] | None) -> int:
    n_local = num_experts if local_experts is None else len(local_experts)
    return top_k + min(n_local, num_experts - top_k)


def output_width(
    top_k: int, num_experts: int, policy: str, local_experts: Sequence[int] | None
) -> int:
    """k' of :func:`route`'s outputs."""
    return get_policy(policy).output_width(top_k, num_experts, local_experts)


def _check(probs, topk_ids, topk_weights, policy, capacity_scope, num_sequences, valid):
    if probs.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
        raise ValueError(
            "route expects probs [T, E], topk_ids [T, k] and topk_weights [T, k]; got "
            f"{tuple(probs.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[0] != probs.shape[0]:
        raise ValueError("probs and topk_ids disagree on T")
    get_policy(policy)  # raises on an unknown name
    if capacity_scope not in SCOPES:
        raise ValueError(f"capacity_scope={capacity_scope!r}: expected one of {SCOPES}")
    if capacity_scope == "sequence" and num_sequences < 1:
        raise ValueError("capacity_scope='sequence' needs num_sequences >= 1")
    if valid is not None and tuple(valid.shape) != (probs.shape[0],):
        raise ValueError(f"valid must have shape [T]={probs.shape[0]}, got {tuple(valid.shape)}")


def route_reference(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    capacity_factor: float | None,
    policy: str = "score",
    local_experts: Sequence[int] | None = None,
    renormalize: bool = False,
    reroute_rounds: int = 1,
    seed: int = 0,
    min_tokens: int = 0,
    min_capacity: int = 1,
    capacity_align: int = 1,
    capacity_scope: str = "batch",
    num_sequences: int = 1,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's capacity-aware assignment. See :func:`capmoe_compile.route` for the contract."""
    _check(probs, topk_ids, topk_weights, policy, capacity_scope, num_sequences, valid)
    T, E = probs.shape
    k = topk_ids.shape[1]
    ids = topk_ids.long()
    if capacity_factor is None:
        return ids.clone(), topk_weights.clone()
    if T == 0 or (valid is None and T < min_tokens):
        return _unchanged(ids, topk_weights, k, E, policy, local_experts)

    G = num_sequences if capacity_scope == "sequence" else 1
    if T % G:
        raise ValueError(f"T={T} rows do not split into num_sequences={G} equal sequences")
    rows_valid = None if valid is None else valid.bool()  # None: every row counts
    cap_g = _group_capacity(
        rows_valid, T, G, E, k, capacity_factor, min_capacity, capacity_align, probs.device
    )

    pol = get_policy(policy)
    if pol.candidates is None:
        kept_slot, dense = _keep_pairs(pol, probs, ids, rows_valid, cap_g, G, seed)
        out_ids = torch.where(kept_slot, ids, E)
        out_w = torch.where(kept_slot, topk_weights, torch.zeros_like(topk_weights))
        if pol.after is not None:
            step = _Kept(probs, ids, topk_weights, rows_valid, kept_slot, dense, cap_g, G)
            out_ids, out_w = pol.after(step, out_ids, out_w, reroute_rounds)
    else:
        rows = _every_row(rows_valid, T, probs)
        out_ids, out_w = pol.candidates(probs, ids, topk_weights, rows, cap_g, G, local_experts)

    if renormalize:
        out_w = renormalized(topk_weights, out_w)

    if valid is not None and min_tokens > 0:
        # Data-dependent count: choose with where, no host sync.
        small = rows_valid.sum() < min_tokens
        same_ids, same_w = _unchanged(ids, topk_weights, k, E, policy, local_experts)
        out_ids = torch.where(small, same_ids, out_ids)
        out_w = torch.where(small, same_w, out_w)
    return out_ids, out_w


def _every_row(rows_valid: torch.Tensor | None, T: int, like: torch.Tensor) -> torch.Tensor:
    """``rows_valid`` [T], or all True where it is None (every row counts)."""
    if rows_valid is not None:
        return rows_valid
    return torch.ones(T, dtype=torch.bool, device=like.device)


def _group_capacity(rows_valid, T, G, E, k, gamma, min_capacity, align, device) -> torch.Tensor:
    """``C`` of each of the ``G`` groups as a ``[G, 1, 1]`` tensor: exact ints when every row
    counts (``rows_valid`` None), computed from each group's real rows when padding is
    excluded."""
    R = T // G
    if rows_valid is None:
        cap = capacity(R, E, k, gamma, min_capacity, align)
        return torch.full((G, 1, 1), cap, dtype=torch.int64, device=device)
    counts = rows_valid.view(G, R).sum(1)
    return capacity(counts, E, k, gamma, min_capacity, align).view(G, 1, 1)


#: Size dispatch of the policies in :data:`PAIR_POLICIES` (``T * E`` cells, any ``G``). At
#: decode and small prefill sizes the cost is per op, not per element, and the dense ranking
#: (:func:`_rank_rows` over ``[G, R, E]``: about 8 ops) has fewer ops than the pair ranking
#: (:func:`_keep_selected`: about 25). Both are equal bit for bit (``tests/test_route_pairs.py``
#: runs both forms on both sides of the switches). Measured (CPU, one thread, thread time,
#: ``k`` = 2 and 8): the dense keep costs 0.43-0.63x the pairs' up to 4096 cells, 0.70-0.85x
#: at 8192 and 0.95-1.30x from 16384; ``reroute`` with the dense rounds 0.62-0.94x up to 8192
#: cells, 0.86-1.13x at 16384.
DENSE_CELLS = 8192


@dataclasses.dataclass
class _Kept:
    """What a pair policy kept, for its ``after`` step."""

    probs: torch.Tensor
    ids: torch.Tensor
    topk_weights: torch.Tensor
    rows_valid: torch.Tensor | None
    kept_slot: torch.Tensor  # [T, k]
    dense: tuple[torch.Tensor, torch.Tensor] | None  # (sel, keep) [T, E] where ranked densely
    cap_g: torch.Tensor
    G: int


def _keep_pairs(policy: Policy, probs, ids, rows_valid, cap_g, G, seed):
    """``kept_slot`` [T, k] of a policy of :data:`PAIR_POLICIES`, and the dense ``(sel, keep)``
    [T, E] masks where the dense ranking computed it (None where the pair ranking did)."""
    T, E = probs.shape
    if T * E > DENSE_CELLS:
        # Ranked on the T*k selected pairs (_keep_selected): cost grows with T*k, not T*E.
        key = policy.pair_key(probs, ids, seed)
        kept = _keep_selected(key, ids, rows_valid, cap_g, G, E)
        return kept, None
    sel = torch.zeros(T, E, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
    if rows_valid is not None:
        sel &= rows_valid[:, None]
    view = (G, T // G, E)
    key = policy.dense_key(probs, seed).reshape(view)
    keep = sel & (_rank_rows(key, sel.view(view)) < cap_g).reshape(T, E)
    return keep.gather(1, ids), (sel, keep)


def _score_dense(probs: torch.Tensor, seed: int) -> torch.Tensor:
    return probs


def _score_pairs(probs: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    return probs.gather(1, ids).float()


def _row_index(T: int, width: int, device) -> torch.Tensor:
    return torch.arange(T, device=device).view(-1, 1).expand(T, width)


def _order_dense(probs, seed):  # earlier rows first
    return -_row_index(probs.shape[0], probs.shape[1], probs.device)


def _order_pairs(probs, ids, seed):
    return -_row_index(ids.shape[0], ids.shape[1], ids.device)


def _reverse_dense(probs, seed):  # later rows first
    return _row_index(probs.shape[0], probs.shape[1], probs.device)


def _reverse_pairs(probs, ids, seed):
    return _row_index(ids.shape[0], ids.shape[1], ids.device)


def _random_dense(probs, seed):
    T, E = probs.shape
    return _hash_scores(seed, T, E, probs.device)


def _random_pairs(probs, ids, seed):
    return _hash_keys(seed, torch.arange(ids.shape[0], device=ids.device).view(-1, 1), ids)


def _reroute_after(kept: _Kept, out_ids, out_w, rounds: int):
    """Token Reroute's proposal rounds on what ``score`` kept."""
    if rounds <= 0:
        return out_ids, out_w
    probs, ids = kept.probs, kept.ids
    T, E = probs.shape
    scale = token_scale(probs, ids, kept.topk_weights)
    P, G = probs.float(), kept.G
    if kept.dense is not None:  # small: the dense rounds (see DENSE_CELLS)
        sel, keep = kept.dense
        args = (out_ids, out_w, kept.cap_g, (G, T // G, E), scale, rounds)
        return _reroute_dense(P, sel, keep, *args)
    args = (out_ids, out_w, kept.cap_g, G, scale, rounds)
    return _reroute(P, ids, kept.kept_slot, _every_row(kept.rows_valid, T, P), *args)


def _expanded_drop(probs, ids, topk_weights, rows_valid, cap_g, G, local_experts):
    """SPEC's expanded_drop: candidates S plus every local expert of every real row; each
    expert keeps its ``C`` candidates of largest P; the added pairs go in extra columns with
    weight ``P * scale`` (the token's ``W / P``)."""
    T, E = probs.shape
    k = ids.shape[1]
    dev = probs.device
    P = probs.float()
    # Selection S as a dense [T, E] mask (padding rows select nothing).
    sel = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, ids, True)
    sel &= rows_valid[:, None]
    local = torch.zeros(E, dtype=torch.bool, device=dev)
    if local_experts is None:
        local[:] = True
    else:
        local[list(local_experts)] = True
    cand = sel | (local[None, :] & rows_valid[:, None])
    view = (G, T // G, E)
    keep = cand & (_rank_rows(P.view(view), cand.view(view)) < cap_g).reshape(T, E)
    kept_slot = keep.gather(1, ids)
    out_ids = torch.where(kept_slot, ids, torch.full_like(ids, E))
    out_w = torch.where(kept_slot, topk_weights, torch.zeros_like(topk_weights))
    scale = token_scale(probs, ids, topk_weights)
    n_extra = _expanded_width(k, E, local_experts) - k
    added = keep & ~sel
    e_ids = torch.arange(E, device=dev).expand(T, E)
    extra = torch.where(added, e_ids, torch.full_like(e_ids, E)).sort(-1).values[:, :n_extra]
    got = extra < E
    pe = P.gather(1, extra.clamp_max(E - 1)) * scale[:, None]
    out_ids = torch.cat([out_ids, extra], 1)
    out_w = torch.cat([out_w, torch.where(got, pe, 0.0).to(out_w.dtype)], 1)
    return out_ids, out_w


#: The config knobs that are arguments of :func:`route_reference`, under the same names.
ROUTE_KNOBS = (
    "capacity_factor",
    "policy",
    "local_experts",
    "renormalize",
    "reroute_rounds",
    "seed",
    "min_tokens",
    "min_capacity",
    "capacity_align",
    "capacity_scope",
)


def route_with_options(probs, topk_ids, topk_weights, opts, **overrides):
    """:func:`route_reference` with its knobs taken from a resolved options dict
    (``capmoe_compile.config.resolve``); ``overrides`` win over ``opts``."""
    kw = {name: opts[name] for name in ROUTE_KNOBS}
    kw.update(overrides)
    return route_reference(probs, topk_ids, topk_weights, **kw)


def _unchanged(ids, weights, k, E, policy, local_experts):
    width = output_width(k, E, policy, local_experts)
    T = ids.shape[0]
    if width == k:
        return ids.clone(), weights.clone()
    return (
        torch.cat([ids, ids.new_full((T, width - k), E)], 1),
        torch.cat([weights, weights.new_zeros(T, width - k)], 1),
    )


def _reroute(P, ids, kept_slot, rows_valid, out_ids, out_w, cap_g, G: int, scale, rounds):
    """SPEC's Token Reroute rounds after ``score`` kept ``kept_slot`` [T, k] of ``ids``: what
    :func:`_reroute_dense` computes, with every count taken from the pairs (not summed over
    ``[T, E]`` masks), each row's proposals taken by one ``topk`` of ``min(k, E)`` unique
    (key, expert) codes (the first ones of the stable descending sort of the row's ``E``
    columns, unavailable experts as ``-inf``) and the experts' acceptance ranked on the
    ``T * min(k, E)`` proposal pairs (:func:`_keep_selected`), not by a sort of ``T * E``."""
    T, E = P.shape
    k = ids.shape[1]
    dev = P.device
    view = (G, T // G, E)
    m = min(k, E)
    ebits = max(1, (E - 1).bit_length())
    e_col = torch.arange(E, device=dev)
    j_col = torch.arange(m, device=dev)
    g_of = (torch.arange(T, device=dev) // (T // G)).view(T, 1)
    # a row's distinct experts: slot j counts unless an earlier slot holds the same expert
    later = torch.ones(k, k, dtype=torch.bool, device=dev).triu(1)  # [i, j]: i < j
    first = ~((ids[:, :, None] == ids[:, None, :]) & later).any(1)
    member = first & rows_valid[:, None]
    kept_n = torch.zeros(G * E, dtype=torch.int64, device=dev).scatter_add_(
        0, (g_of * E + ids).reshape(-1), (member & kept_slot).reshape(-1).long()
    )
    spare = (cap_g.reshape(G, 1) - kept_n.view(G, E)).clamp_min(0)  # [G, E]
    want = (member & ~kept_slot).sum(-1)  # proposals each token may still make
    # selected or already proposed to: never available again (assigned experts are either)
    blocked = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, ids, True)
    # codes ascend as the stable descending sort of P orders a row's columns (ties: smaller
    # expert); an unavailable expert takes -inf's code, as the dense form masks it to -inf
    base = ((_descending_u32(P) << ebits) | e_col).view(view)
    inf_code = (_NEG_INF_CODE << ebits) | e_col
    for _ in range(rounds):
        unavail = blocked.view(view) | (spare <= 0).view(G, 1, E)
        code = torch.where(unavail, inf_code, base).view(T, E)
        e_prop = torch.topk(code, m, dim=-1, largest=False, sorted=True).indices  # [T, m]
        propose = (~unavail.view(T, E)).gather(1, e_prop) & (j_col < want[:, None])
        accept = propose & _keep_selected(
            P.gather(1, e_prop), e_prop, None, None, G, E, member=propose, cap_seg=spare
        )
        blocked = blocked.scatter(1, e_prop, propose | blocked.gather(1, e_prop))
        acc_n = torch.zeros(G * E, dtype=torch.int64, device=dev).scatter_add_(
            0, (g_of * E + e_prop).reshape(-1), accept.reshape(-1).long()
        )
        spare = spare - acc_n.view(G, E)
        n_acc = accept.sum(-1)
        want = want - n_acc
        # Fill the token's still-dropped slots, in slot order, with its accepted experts in
        # order of preference (accepted proposals first, in proposal order).
        acc_e = e_prop.gather(1, torch.sort((~accept).to(torch.uint8), dim=-1, stable=True).indices)
        out_ids, out_w = _fill_dropped(out_ids, out_w, acc_e, n_acc, P, scale)
    return out_ids, out_w


def _fill_dropped(out_ids, out_w, acc_e, n_acc, P, scale):
    """A reroute round's result: each token's still-dropped slots (id ``E``), in slot order,
    take its first ``n_acc`` accepted experts ``acc_e`` (in order of preference), weighted
    ``P * scale``."""
    E = P.shape[1]
    hole = out_ids == E  # only valid rows with dropped slots have n_acc > 0
    nth = hole.long().cumsum(-1) - 1
    fill = hole & (nth < n_acc[:, None])
    new_e = acc_e.gather(1, nth.clamp(0, acc_e.shape[1] - 1))
    out_ids = torch.where(fill, new_e, out_ids)
    new_w = (P.gather(1, new_e) * scale[:, None]).to(out_w.dtype)
    return out_ids, torch.where(fill, new_w, out_w)


def _reroute_dense(P, sel, keep, out_ids, out_w, cap_g, view, scale, rounds):
    """SPEC's Token Reroute rounds over the dense ``[T, E]`` view (a sort of ``T * E`` per
    round): :func:`_reroute`'s reference (``tests/test_route_pairs.py``)."""
    T, E = P.shape
    dev = P.device
    assigned = keep.clone()
    proposed = torch.zeros_like(keep)
    dropped_pairs = sel & ~keep
    want = dropped_pairs.sum(-1)  # proposals each token may still make
    spare = (cap_g - keep.view(view).sum(1, keepdim=True)).clamp_min(0)  # [G, 1, E]
    e_idx = torch.arange(E, device=dev).expand(T, E)
    for _ in range(rounds):
        open_e = (spare > 0).expand(view).reshape(T, E)
        avail = ~assigned & ~proposed & ~sel & open_e
        pref = torch.sort(
            P.masked_fill(~avail, float("-inf")), dim=-1, descending=True, stable=True
        )
        prank = torch.empty_like(pref.indices).scatter_(
            1, pref.indices, torch.arange(E, device=dev).expand(T, E)
        )
        propose = avail & (prank < want[:, None])
        proposed |= propose
        accept = propose & (_rank_rows(P.view(view), propose.view(view)) < spare).reshape(T, E)
        assigned |= accept
        spare = spare - accept.view(view).sum(1, keepdim=True)
        n_acc = accept.sum(-1)
        want = want - n_acc
        # Fill the token's still-dropped slots, in slot order, with its accepted experts in
        # order of preference.
        acc_key = torch.where(accept, prank, torch.full_like(prank, E))
        acc_e = e_idx.gather(1, acc_key.sort(dim=-1, stable=True).indices)
        out_ids, out_w = _fill_dropped(out_ids, out_w, acc_e, n_acc, P, scale)
    return out_ids, out_w


register_policy(
    Policy(
        "score",
        "keep the pairs of largest router probability (Token Drop)",
        _score_pairs,
        _score_dense,
    )
)
register_policy(Policy("order", "keep the earliest tokens", _order_pairs, _order_dense))
register_policy(Policy("reverse", "keep the latest tokens", _reverse_pairs, _reverse_dense))
register_policy(Policy("random", "keep a seeded hash-random choice", _random_pairs, _random_dense))
register_policy(
    Policy(
        "expanded_drop",
        "also offer every local expert to every token; keep the largest probabilities",
        candidates=_expanded_drop,
        width=_expanded_width,
    )
)
register_policy(
    Policy(
        "reroute",
        "Token Drop, then dropped pairs propose to experts with room (Token Reroute)",
        _score_pairs,
        _score_dense,
        after=_reroute_after,
    )
)

#: The built-in policies (``policy_names()`` also lists registered ones).
POLICIES = policy_names()
#: The built-in pair policies (ranked per selected pair).
PAIR_POLICIES = tuple(n for n in POLICIES if get_policy(n).candidates is None)
