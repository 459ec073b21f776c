"""Group-limited routing (DeepSeek-V3): a top-k over expert *groups* whose result masks the
scores of the real top-k over experts. The group top-k is a stage of that router, not a
router of its own; P is read at the real top-k (``sigmoid.py``, ``softmax.py``)."""

from __future__ import annotations

from torch import fx

from .core import TopKSite, reaches, register_site_rewrite


def _stack_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def limits_another(site: TopKSite, sites: list[TopKSite]) -> bool:
    """``site`` is a top-k over fewer "experts" whose result shapes the scores of another
    top-k of the same module."""
    path = _stack_path(site.node)
    later = {
        s.scores
        for s in sites
        if s is not site and s.num_experts > site.num_experts and _stack_path(s.node) == path
    }
    return bool(later) and reaches(site.node, lambda n: n in later)


@register_site_rewrite(priority=10)
def drop_group_stages(sites: list[TopKSite]) -> list[TopKSite]:
    """The sites less those that are a stage of another site's group-limited routing."""
    return [s for s in sites if not limits_another(s, sites)]
