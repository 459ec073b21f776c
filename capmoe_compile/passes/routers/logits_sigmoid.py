"""Top-k over raw router logits, a sigmoid of the selected only: Llama-4 (the top values
scattered into a ``-inf`` row over all experts, then a sigmoid: unselected experts score 0)
and routers that weight each selected expert by ``sigmoid(top_value)``.

P (SPEC.md, "Notation"): the model's score function is the sigmoid, applied here to the
selected logits only; P is that function over all experts, ``P = sigmoid(logits)``, for
ranking only (as GPT-OSS's softmax over the selected gives ``P = softmax(logits)``). The
weights the model computes are then ``P`` at its selection: the per-token scale is 1."""

from __future__ import annotations

import torch
from torch import fx

from .core import (
    SIGMOID,
    RouterMatch,
    TopKSite,
    is_call,
    register_router,
    shape_of,
    skip_value_preserving,
)
from .logits import raw_logits, temperature_scaled

_SCATTER = {torch.scatter, "scatter", "scatter_"}


def _to_sigmoid(node: fx.Node) -> bool:
    """Some reader of ``node`` (through casts and views) is a sigmoid."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if is_call(u, SIGMOID):
                return True
            if skip_value_preserving(u) is n:  # a cast or view of n
                todo.append(u)
    return False


def _scattered_into_neg_inf(site: TopKSite, node: fx.Node) -> fx.Node | None:
    """``node`` is ``full_like(scores, -inf).scatter_(-1, indices, values)`` (Llama-4's row of
    selected logits over all experts); returns the row."""
    if not is_call(node, _SCATTER) or node.kwargs or len(node.args) != 4:
        return None
    base, dim, index, src = node.args
    if src is not site.values or skip_value_preserving(index) is not site.indices:
        return None
    if dim not in (-1, len(shape_of(site.scores)) - 1):
        return None
    if not isinstance(base, fx.Node) or base.target is not torch.full_like:
        return None
    fill = base.args[1] if len(base.args) > 1 else base.kwargs.get("fill_value")
    return node if fill == float("-inf") else None


@register_router(
    priority=45,
    p_rule="sigmoid of the (temperature-scaled) logits over all experts, for ranking only",
)
def logits_topk_sigmoid(site: TopKSite) -> RouterMatch | None:
    """top-k over raw (or temperature-scaled) logits; the selected values go through a
    sigmoid, directly or scattered into a ``-inf`` row first (Llama-4)."""
    src = skip_value_preserving(site.scores)
    if site.values is None or not (raw_logits(src) or temperature_scaled(src)):
        return None
    rows = [_scattered_into_neg_inf(site, u) for u in site.values.users]
    if _to_sigmoid(site.values) or any(r is not None and _to_sigmoid(r) for r in rows):
        return RouterMatch("logits_topk_sigmoid", site, src, score_of_logits="sigmoid")
    return None
