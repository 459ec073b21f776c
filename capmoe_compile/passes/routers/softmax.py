"""Softmax over experts, then the selection: Mixtral, Qwen-MoE, OLMoE (top-k, renormalised or
not), Switch (top-1), Ernie-4.5 (a selection bias on the softmax output)."""

from __future__ import annotations

import dataclasses

from .core import (
    SOFTMAX,
    RouterMatch,
    TopKSite,
    is_call,
    last_dim_softmax,
    register_router,
    skip_value_preserving,
    upstream,
)


@register_router(priority=90, p_rule="the softmax the top-1 ranked")
def softmax_top1(site: TopKSite) -> RouterMatch | None:
    """softmax -> max/top-1 (Switch Transformer style)."""
    if site.k != 1:
        return None
    m = softmax_topk(site)
    return dataclasses.replace(m, kind="softmax_top1") if m else None


@register_router(priority=80, p_rule="the softmax the top-k ranked")
def softmax_topk(site: TopKSite) -> RouterMatch | None:
    """softmax over experts -> top-k (Mixtral, Qwen-MoE, OLMoE; renormalised or not)."""
    src = skip_value_preserving(site.scores)
    if is_call(src, SOFTMAX) and last_dim_softmax(src):
        return RouterMatch("softmax_topk", site, src)
    return None


@register_router(priority=70, p_rule="the softmax over experts before a selection bias or mask")
def softmax_bias_topk(site: TopKSite) -> RouterMatch | None:
    """softmax over experts, then a selection bias or mask, then top-k (Ernie-4.5's
    ``e_score_correction_bias`` on the softmax output).

    P is the softmax output: SPEC.md's P is the score function before any selection bias;
    the bias only shapes the model's selection S (the weights are gathered from P or from
    the biased scores, whichever the model reads: W is found in the region, not assumed)."""
    n = upstream(site, SOFTMAX)
    if n is not None and last_dim_softmax(n):
        return RouterMatch("softmax_bias_topk", site, n)
    return None
