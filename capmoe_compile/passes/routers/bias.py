"""Top-k over scores plus a token-independent selection bias: Kolibri-1 (raw logits + bias,
sigmoid of the selected), DeepSeek-V4 (another score function + bias)."""

from __future__ import annotations

from torch import fx

from .core import (
    ADD,
    LINEAR,
    RouterMatch,
    TopKSite,
    is_call,
    known_equal,
    register_router,
    same_shape,
    shape_of,
    skip_value_preserving,
    token_independent,
)


def _numel(shape: tuple):
    n = 1
    for d in shape:
        n = n * d
    return n


@register_router(
    priority=40,
    p_rule="the scores the bias is added to; softmax of them over all experts if raw logits",
)
def scores_bias_topk(site: TopKSite) -> RouterMatch | None:
    """top-k over scores plus a token-independent selection bias. SPEC's generic rule, with
    the bias identified and excluded: P is the scores the bias is added to, or their softmax
    over all experts where they are raw logits (``linear`` output)."""
    src = skip_value_preserving(site.scores)
    if not is_call(src, ADD) or len(src.args) != 2:
        return None
    a, b = src.args
    shape = shape_of(site.scores)
    for x, bias in ((a, b), (b, a)):
        if not isinstance(x, fx.Node) or not isinstance(bias, fx.Node):
            continue
        bshape = shape_of(bias)
        if not same_shape(shape_of(x), shape) or bshape is None:
            continue
        if not known_equal(_numel(bshape), site.num_experts) or not token_independent(bias):
            continue
        if is_call(skip_value_preserving(x), LINEAR):
            return RouterMatch("logits_bias_topk", site, x, score_of_logits="softmax")
        return RouterMatch("scores_bias_topk", site, x)
    return None
