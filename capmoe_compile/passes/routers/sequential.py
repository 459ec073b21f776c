"""Top-2 as two top-1 picks (PhiMoE's sparsemixer at inference): the max, then the max over
the same scores with the first pick set to ``-inf``; the picks' indices concatenated."""

from __future__ import annotations

import torch
from torch import fx

from .core import (
    LINEAR,
    RouterMatch,
    TopKSite,
    is_call,
    register_router,
    register_site_rewrite,
    same_shape,
    shape_of,
    skip_value_preserving,
)

_SCATTER = {torch.scatter, "scatter"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _excludes(later: TopKSite, first: TopKSite) -> bool:
    """``later`` ranks ``first``'s scores with ``first``'s pick set to -inf:
    ``scatter(scores, -1, first_index, -inf)`` (casts and views aside)."""
    src = skip_value_preserving(later.scores)
    if not is_call(src, _SCATTER) or src.kwargs:
        return False
    if len(src.args) != 4:
        return False
    inp, dim, index, value = src.args
    shape = shape_of(first.scores)
    return (
        isinstance(inp, fx.Node)
        and isinstance(index, fx.Node)
        and skip_value_preserving(inp) is skip_value_preserving(first.scores)
        and skip_value_preserving(index) is first.indices
        and dim in (-1, len(shape) - 1)
        and value == float("-inf")
        and same_shape(shape_of(first.indices), (*shape[:-1], 1))
    )


def _concat_of(first: TopKSite, later: TopKSite) -> fx.Node | None:
    """``cat([first.indices, later.indices], -1)``, if the graph has it."""
    last = len(shape_of(first.scores)) - 1
    for u in first.indices.users:
        if (
            is_call(u, _CAT)
            and len(u.args) >= 1
            and list(u.args[0]) == [first.indices, later.indices]
            and (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)) in (-1, last)
        ):
            return u
    return None


@register_site_rewrite(priority=20)
def sequential_picks(sites: list[TopKSite]) -> list[TopKSite]:
    """Two top-1 sites that are one top-2: the second max runs over the first's scores with
    the first's pick scattered to -inf, and the two picks' indices ([.., 1] each) are
    concatenated along the last dim, first pick first: the same selection as a top-2 over
    the first's scores. Reported as one site of k=2 over those scores, whose indices are the
    concatenation; each pick's values stay in the region (the router's own tail computes W
    from them)."""
    out = list(sites)
    for first in sites:
        for later in sites:
            if first.k != 1 or later.k != 1 or later is first or first not in out:
                continue
            if later not in out or not _excludes(later, first):
                continue
            cat = _concat_of(first, later)
            if cat is None:
                continue
            out.remove(first)
            out.remove(later)
            picks = (first.node, later.node)
            out.append(
                TopKSite(first.node, None, cat, 2, first.num_experts, first.scores, picks=picks)
            )
    return out


@register_router(
    priority=30,
    picks=True,
    p_rule="softmax of the raw logits over all experts (both picks rank the logits)",
)
def sequential_top1(site: TopKSite) -> RouterMatch | None:
    """Top-2 as two top-1 picks over raw router logits (each weight a softmax over the logits
    near its pick). SPEC's generic rule: both picks rank the raw logits (the second among the
    experts left), so P = softmax of the logits over all experts, for ranking only; the
    weights W are the model's own."""
    if not site.picks:
        return None
    src = skip_value_preserving(site.scores)
    if is_call(src, LINEAR):
        return RouterMatch("sequential_top1_logits", site, src, score_of_logits="softmax")
    return None
