"""Sigmoid scores, then a selection bias and group-limited masking, then top-k
(DeepSeek-V3, GLM-4.5-MoE style)."""

from __future__ import annotations

from .core import SIGMOID, RouterMatch, TopKSite, register_router, upstream


@register_router(
    priority=60,
    p_rule="the sigmoid output before the selection bias and group masking",
)
def sigmoid_bias_grouped_topk(site: TopKSite) -> RouterMatch | None:
    """sigmoid scores (+ selection bias, group-limited masking) -> top-k (DeepSeek-V3 style).

    P is the sigmoid output; the bias and group masking only shape the model's selection S.
    """
    n = upstream(site, SIGMOID)
    return RouterMatch("sigmoid_bias_grouped_topk", site, n) if n is not None else None
