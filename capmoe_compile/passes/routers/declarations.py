"""Routers declared with ``@capmoe_compile.router(top_k=k, score=...)``: the marker op is the
site, and the declaration says how P is read."""

from __future__ import annotations

from torch import fx

from .core import (
    RouterMatch,
    TopKSite,
    declared_node,
    getitem_users,
    register_router,
    register_site,
    shape_of,
)


@register_site(priority=100)
def declared_site(node: fx.Node) -> TopKSite | None:
    """The ``declared_router`` marker, whose outputs are the declared ids and weights (its
    own top-k, if any, is not reported twice: see ``topk.feeds_declared``)."""
    if not declared_node(node):
        return None
    outs = getitem_users(node)
    if 0 not in outs:
        return None
    logits = node.args[0]
    E = shape_of(logits)[-1]
    return TopKSite(node, outs.get(1), outs[0], node.args[3], E, logits)


@register_router(
    priority=100,
    p_rule="as declared: the declared scores, or softmax/sigmoid of them (score=...)",
)
def declared(site: TopKSite) -> RouterMatch | None:
    """A routing function decorated with ``@capmoe_compile.router(top_k=k, score=...)``."""
    if declared_node(site.node):
        return RouterMatch("declared", site, site.scores, score_of_logits=site.node.args[4])
    return None


def strip_declared(graph: fx.Graph) -> None:
    """Remove the ``declared_router`` markers: their outputs are their inputs."""
    for node in list(graph.nodes):
        if declared_node(node):
            for u in list(node.users):
                u.replace_all_uses_with(node.args[2 if u.args[1] == 1 else 1])
                graph.erase_node(u)
            graph.erase_node(node)
