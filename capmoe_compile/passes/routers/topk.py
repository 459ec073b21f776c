"""The plain spellings of a top-k over experts: ``topk(scores, k, dim=-1)`` and, as a top-1,
``max(scores, dim=-1)``."""

from __future__ import annotations

import torch
from torch import fx

from .core import (
    TopKSite,
    declared_node,
    float_scores,
    getitem_users,
    is_call,
    reaches,
    register_site,
)


def feeds_declared(node: fx.Node) -> bool:
    """``node`` feeds a declared router (its top-k is the declaration's, not a site)."""
    return reaches(node, declared_node, limit=64)


def last_dim_k(node: fx.Node, shape: tuple, top1: bool) -> int | None:
    """The ``k`` of a ``topk``/``max``/``argmax`` call over the last dim of ``shape``, or None
    (another dim, no dim, or a ``k`` that is not a Python int)."""
    if top1:
        if len(node.args) < 2 and "dim" not in node.kwargs:
            return None  # max()/argmax() of everything: not over experts
        k, dim = 1, node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    else:
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if not isinstance(k, int) or dim not in (-1, len(shape) - 1) or feeds_declared(node):
        return None
    return k


@register_site(priority=50)
def topk_site(node: fx.Node) -> TopKSite | None:
    """``topk(scores, k, -1)`` or ``max(scores, -1)``, values and indices read by index."""
    is_topk = is_call(node, {torch.topk, "topk"})
    if not (is_topk or is_call(node, {torch.max, "max"})):
        return None
    shape = float_scores(node.args[0])
    if shape is None:
        return None
    k = last_dim_k(node, shape, top1=not is_topk)
    outs = getitem_users(node)
    if k is None or 1 not in outs:
        return None
    return TopKSite(node, outs.get(0), outs[1], k, shape[-1], node.args[0])
