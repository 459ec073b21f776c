"""The ranking primitives the policies are built from: :func:`_rank_rows` (the dense rank of
every row in its expert column, ties to the smaller row) and :func:`_keep_selected` (the same
decision computed on the selected pairs only)."""

from __future__ import annotations

import torch


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
