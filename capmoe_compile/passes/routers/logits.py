"""Top-k over raw router logits, the score function applied to the selected only: GPT-OSS and
Granite (softmax over the k selected), and logits under a temperature (``gate(x) / tau``)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .core import (
    LINEAR,
    SOFTMAX,
    RouterMatch,
    TopKSite,
    is_call,
    register_router,
    skip_value_preserving,
)

_SCALE = {operator.truediv, operator.mul, torch.div, torch.mul, "div", "mul", "__truediv__"}
_SCALE |= {"__mul__", "__rmul__"}


def temperature_scaled(node: fx.Node) -> bool:
    """``linear(...) / c`` or ``linear(...) * c`` (either order for ``*``) with ``c`` a positive
    Python number: logits under a temperature."""
    if not is_call(node, _SCALE) or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    div = getattr(node.target, "__name__", node.target) in ("truediv", "div", "__truediv__")
    pairs = [(a, b)] if div else [(a, b), (b, a)]
    for t, c in pairs:
        if (
            isinstance(t, fx.Node)
            and isinstance(c, (int, float))
            and not isinstance(c, bool)
            and c > 0
            and is_call(skip_value_preserving(t), LINEAR)
        ):
            return True
    return False


def raw_logits(node: fx.Node) -> bool:
    """``node`` is router logits: a ``linear``/``matmul`` output (casts and views aside)."""
    return is_call(skip_value_preserving(node), LINEAR)


@register_router(
    priority=50,
    p_rule="softmax of the (temperature-scaled) logits over all experts, for ranking only",
)
def logits_topk_softmax(site: TopKSite) -> RouterMatch | None:
    """top-k over raw logits, softmax over the selected (GPT-OSS, Granite style); also over
    logits scaled by a positive constant (a temperature: ``gate(x) / tau``), where P is the
    softmax of the scaled logits over all experts (SPEC.md, generic router)."""
    src = skip_value_preserving(site.scores)
    if site.values is None or not any(is_call(u, SOFTMAX) for u in site.values.users):
        return None
    if is_call(src, LINEAR):
        return RouterMatch("logits_topk_softmax", site, src, score_of_logits="softmax")
    if temperature_scaled(src):
        return RouterMatch("scaled_logits_topk_softmax", site, src, score_of_logits="softmax")
    return None
