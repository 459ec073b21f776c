"""``reroute`` (the paper's Token Reroute): ``score``, then dropped pairs propose to the
experts with room, in parallel rounds (SPEC.md, "reroute")."""

from __future__ import annotations

import torch

from .ranking import _NEG_INF_CODE, _descending_u32, _keep_selected, _rank_rows
from .registry import Kept, Policy, _every_row, register_policy, token_scale
from .score import _score_dense, _score_pairs


def _reroute_after(kept: Kept, out_ids, out_w, rounds: int):
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
        "reroute",
        "Token Drop, then dropped pairs propose to experts with room (Token Reroute)",
        _score_pairs,
        _score_dense,
        after=_reroute_after,
        copy_form="proposal_rounds",
    )
)
