"""Top-1 by ``argmax(scores, dim=-1)`` (GShard, Switch): the indices alone, no values; the
weight, if any, is the model's own gather."""

from __future__ import annotations

import torch
from torch import fx

from .core import TopKSite, float_scores, is_call, register_site
from .topk import last_dim_k


@register_site(priority=40)
def argmax_site(node: fx.Node) -> TopKSite | None:
    """``argmax(scores, -1)``: a site of k = 1 whose indices are the node itself."""
    if not is_call(node, {torch.argmax, "argmax"}):
        return None
    shape = float_scores(node.args[0])
    if shape is None or last_dim_k(node, shape, top1=True) is None:
        return None
    return TopKSite(node, None, node, 1, shape[-1], node.args[0])
