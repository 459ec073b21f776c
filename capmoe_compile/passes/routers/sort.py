"""A top-k spelled as a descending sort over experts and a slice of the first ``k``:
``probs.sort(-1, descending=True)`` then ``[..., :k]`` of values and indices, or
``probs.argsort(-1, descending=True)[..., :k]`` (indices only, as an argmax). SPEC.md: "A
descending ``sort``/``argsort`` and a slice of the first ``k`` is a top-k"; how P is read is
then the business of the router patterns, as for any other site."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .core import TopKSite, float_scores, getitem_users, is_call, register_site


def leading_slice(node: fx.Node, rank: int) -> int | None:
    """``k`` where ``node`` is ``t[..., :k]`` (or ``t[:, :k]`` for ``rank`` 2) of its input."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not idx or not isinstance(idx[-1], slice):
        return None
    last = idx[-1]
    whole = slice(None)
    head = idx[:-1]
    if not (head == (Ellipsis,) or (len(head) == rank - 1 and all(h == whole for h in head))):
        return None
    if last.start not in (None, 0) or last.step not in (None, 1) or not isinstance(last.stop, int):
        return None
    return last.stop if last.stop > 0 else None


@register_site(priority=90)
def sort_site(node: fx.Node) -> TopKSite | None:
    """``sort(scores, -1, descending=True)`` with both outputs cut to the same ``[..., :k]``
    (or the indices alone), or ``argsort(scores, -1, descending=True)[..., :k]``."""
    is_sort = is_call(node, {torch.sort, "sort"})
    is_argsort = is_call(node, {torch.argsort, "argsort"})
    if not (is_sort or is_argsort) or not isinstance(node.args[0], fx.Node):
        return None
    scores = node.args[0]
    shape = float_scores(scores)
    if shape is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
    if dim not in (-1, len(shape) - 1) or descending is not True:
        return None
    if is_argsort:
        cuts = [(u, leading_slice(u, len(shape))) for u in node.users]
        if len(cuts) != 1 or cuts[0][1] is None:
            return None
        (ind, k), vals = cuts[0], None
    else:
        outs = getitem_users(node)
        if set(outs) - {0, 1} or 1 not in outs:
            return None
        icuts = [(u, leading_slice(u, len(shape))) for u in outs[1].users]
        vcuts = [(u, leading_slice(u, len(shape))) for u in outs[0].users] if 0 in outs else []
        if len(icuts) != 1 or icuts[0][1] is None or len(vcuts) > 1:
            return None
        ind, k = icuts[0]
        vals = vcuts[0][0] if vcuts and vcuts[0][1] == k else None
        if vcuts and vals is None:
            return None
    if k >= shape[-1]:
        return None
    return TopKSite(node, vals, ind, k, shape[-1], scores)
