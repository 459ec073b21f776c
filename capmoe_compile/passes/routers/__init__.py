"""Router patterns: how models spell "scores over experts -> top-k", and how ``P`` is read.

One module per family of spellings, each registering its members with a priority:

- site spellings (``core.register_site``): ``topk.py`` (``topk``, ``max(dim)``), ``argmax.py``,
  ``sort.py`` (a descending sort/argsort and a slice), ``declarations.py``
  (``@capmoe_compile.router``); site rewrites (``core.register_site_rewrite``):
  ``sequential.py`` (two top-1 picks that are one top-2), ``grouped.py`` (a group-limited
  stage is part of the later top-k);
- router patterns (``core.register_router``): ``declarations.py``, ``softmax.py``,
  ``sigmoid.py``, ``logits.py``, ``logits_sigmoid.py``, ``bias.py``, ``sequential.py``, ...
  Each says how it reads the router probabilities ``P`` (SPEC.md, "Notation"; ``p_rule``). They are tried by
  priority; the first that recognises a site names its router kind.

``docs/extending.md`` has the recipe for a new one.
"""

from __future__ import annotations

# each module registers its members when imported (the order does not matter: priorities do)
from . import argmax, grouped, sort, topk
from .bias import scores_bias_topk
from .core import (
    PATTERNS,
    ROUTER_PATTERNS,
    SITE_REWRITES,
    SITE_SPELLINGS,
    RouterMatch,
    TopKSite,
    known_equal,
    p_rule,
    register_router,
    register_site,
    register_site_rewrite,
    same_shape,
)
from .core import skip_value_preserving as _skip_value_preserving
from .declarations import declared, strip_declared
from .logits import logits_topk_softmax
from .logits_sigmoid import logits_topk_sigmoid
from .sequential import sequential_top1
from .sigmoid import sigmoid_bias_grouped_topk
from .sites import find_topk_sites
from .softmax import softmax_bias_topk, softmax_top1, softmax_topk

__all__ = [
    "PATTERNS",
    "ROUTER_PATTERNS",
    "SITE_REWRITES",
    "SITE_SPELLINGS",
    "RouterMatch",
    "TopKSite",
    "argmax",
    "declared",
    "find_topk_sites",
    "grouped",
    "known_equal",
    "logits_topk_sigmoid",
    "logits_topk_softmax",
    "match_router",
    "p_rule",
    "register_router",
    "register_site",
    "register_site_rewrite",
    "same_shape",
    "scores_bias_topk",
    "sequential_top1",
    "sigmoid_bias_grouped_topk",
    "softmax_bias_topk",
    "softmax_top1",
    "softmax_topk",
    "sort",
    "strip_declared",
    "topk",
    "_skip_value_preserving",
]


def match_router(site: TopKSite) -> RouterMatch | None:
    """The first pattern of :data:`ROUTER_PATTERNS` (this module's name, read at each call:
    a test may replace it) that recognises ``site``. A site made of sequential top-1 picks
    is asked only of the patterns registered for them (``picks=True``)."""
    for pattern in ROUTER_PATTERNS:
        if site.picks and not (pattern in PATTERNS and PATTERNS[pattern].picks):
            continue
        m = pattern(site)
        if m is not None:
            return m
    return None
