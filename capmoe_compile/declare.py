"""``@capmoe_compile.router(top_k=k)``: declare a routing function the patterns do not know.

Some models route in ways no pattern of ``passes/routers.py`` recognises (a sort instead of a
top-k, a custom normalisation). Decorating the model's routing function tells the passes "this
is a router with top-k = k": the function must take the router logits ``[T, E]`` first and
return ``(topk_weights [T, k], topk_ids [T, k])``. ``P`` (SPEC.md) is ``score(logits)``
(``"softmax"`` or ``"sigmoid"``).

In eager mode the decorator changes nothing. Under ``torch.compile`` it adds one marker op,
``capmoe::declared_router``, to the graph; the passes treat it as a router site (the experts
it feeds are still found and verified as for any router) and remove the marker afterwards,
whether the layer was rewritten or not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

SCORES = ("softmax", "sigmoid")


@torch.library.custom_op("capmoe::declared_router", mutates_args=())
def declared_router(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, top_k: int, score: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_ids.clone(), topk_weights.clone()


@declared_router.register_fake
def _declared_router_fake(logits, topk_ids, topk_weights, top_k, score):
    return torch.empty_like(topk_ids), torch.empty_like(topk_weights)


def router(*, top_k: int, score: str = "softmax") -> Callable[[Callable], Callable]:
    """Mark ``fn(logits, ...) -> (topk_weights, topk_ids)`` as an MoE router with ``top_k``."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"router: top_k must be an int >= 1; got {top_k!r}")
    if score not in SCORES:
        raise ValueError(f"router: score must be one of {SCORES}; got {score!r}")

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(logits: torch.Tensor, *args, **kwargs):
            weights, ids = fn(logits, *args, **kwargs)
            if torch.compiler.is_compiling():
                ids, weights = declared_router(logits, ids, weights, top_k, score)
            return weights, ids

        return wrapped

    return decorate
