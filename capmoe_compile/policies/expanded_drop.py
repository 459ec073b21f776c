"""``expanded_drop`` (the paper's Expanded Drop): candidates are the selection plus every local
expert of every row; each expert keeps its ``C`` candidates of largest ``P`` (SPEC.md,
"expanded_drop")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ranking import _rank_rows
from .registry import Policy, register_policy, token_scale


def _expanded_width(top_k: int, num_experts: int, local_experts: Sequence[int] | None) -> int:
    n_local = num_experts if local_experts is None else len(local_experts)
    return top_k + min(n_local, num_experts - top_k)


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


register_policy(
    Policy(
        "expanded_drop",
        "also offer every local expert to every token; keep the largest probabilities",
        candidates=_expanded_drop,
        width=_expanded_width,
        copy_form="local_expansion",
    )
)
