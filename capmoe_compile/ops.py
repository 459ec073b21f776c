"""torch.library custom ops of capmoe. Their eager kernels are the reference semantics.

``capmoe::route`` wraps :func:`capmoe_compile.routing.route_reference`; its fake kernel only
needs the output width, so the op traces with symbolic ``T``.
"""

from __future__ import annotations

import torch

from .routing import output_width, route_reference


@torch.library.custom_op("capmoe::route", mutates_args=())
def route_op(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    capacity_factor: float | None,
    policy: str,
    local_experts: list[int] | None,
    renormalize: bool,
    reroute_rounds: int,
    seed: int,
    min_tokens: int,
    min_capacity: int,
    capacity_align: int,
    capacity_scope: str,
    num_sequences: int,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return route_reference(
        probs,
        topk_ids,
        topk_weights,
        capacity_factor=capacity_factor,
        policy=policy,
        local_experts=local_experts,
        renormalize=renormalize,
        reroute_rounds=reroute_rounds,
        seed=seed,
        min_tokens=min_tokens,
        min_capacity=min_capacity,
        capacity_align=capacity_align,
        capacity_scope=capacity_scope,
        num_sequences=num_sequences,
        valid=valid,
    )


@route_op.register_fake
def _route_fake(
    probs,
    topk_ids,
    topk_weights,
    capacity_factor,
    policy,
    local_experts,
    renormalize,
    reroute_rounds,
    seed,
    min_tokens,
    min_capacity,
    capacity_align,
    capacity_scope,
    num_sequences,
    valid,
):
    T, k = topk_ids.shape
    E = probs.shape[1]
    width = k if capacity_factor is None else output_width(k, E, policy, local_experts)
    ids = topk_ids.new_empty((T, width), dtype=torch.int64)
    return ids, topk_weights.new_empty((T, width))
