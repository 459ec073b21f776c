"""Finding the top-k sites of a graph: every registered site spelling asked about every node,
then the registered rewrites over the sites found."""

from __future__ import annotations

from torch import fx

from .core import SITE_REWRITES, SITE_SPELLINGS, TopKSite


def find_topk_sites(graph: fx.Graph) -> list[TopKSite]:
    """Every top-k over the last dim of a float tensor of any rank (``[T, E]``, ``[B, S, E]``,
    ...: the rows are the leading dims flattened) as one of the registered site spellings
    spells it (``topk``/``max(dim)``, ``argmax``, a descending sort and a slice, a router
    declared with ``@capmoe_compile.router``), then the registered rewrites (sequential
    top-1 picks that are one top-k; stages of group-limited routing dropped)."""
    sites = []
    for node in graph.nodes:
        for spelling in SITE_SPELLINGS:
            site = spelling.fn(node)
            if site is not None:
                sites.append(site)
                break
    for rewrite in SITE_REWRITES:
        sites = rewrite.fn(sites)
    return sites
