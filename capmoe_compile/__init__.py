"""capmoe-compile: a torch.compile backend for capacity-aware Mixture-of-Experts inference.

``torch.compile(model, backend="capmoe", options={"capacity_factor": 1.0})`` bounds every
routed expert at ``C = ceil(gamma * T * k / E)`` tokens (SPEC.md), so that under expert
parallelism the most loaded expert stops setting the layer's latency.
"""

# No ``from __future__ import annotations`` and the imports below under private names: the
# package's namespace (``dir(capmoe_compile)``) is its API and its modules, nothing else.
from collections.abc import Sequence as _Sequence

import torch as _torch

from . import config
from . import distributed as _distributed  # noqa: E402, F401

# The lowerings register themselves with ``pipeline`` when imported: one device, and expert
# parallelism (tried first; it accepts only the layers ``expert_parallel`` sharded).
from . import lowering as _lowering  # noqa: E402, F401, I001
from .calibrate import Calibration, calibrate
from .declare import router
from .explain import ExplainReport, explain
from .frozen import freeze_experts, thaw_experts
from .module_config import configure, exempt
from .routing import POLICIES, capacity
from .telemetry import LayerStats, Stats, record_stats

__all__ = [
    "POLICIES",
    "Calibration",
    "ExplainReport",
    "LayerStats",
    "Stats",
    "calibrate",
    "capacity",
    "config",
    "configure",
    "exempt",
    "explain",
    "freeze_experts",
    "record_stats",
    "route",
    "router",
    "thaw_experts",
]
__version__ = "0.1.0"


def route(
    probs: _torch.Tensor,
    topk_ids: _torch.Tensor,
    topk_weights: _torch.Tensor,
    *,
    capacity_factor: float | None,
    policy: str = "score",
    local_experts: _Sequence[int] | None = None,
    renormalize: bool = False,
    reroute_rounds: int = 1,
    seed: int = 0,
    min_tokens: int = 0,
    min_capacity: int = 1,
    capacity_align: int = 1,
    capacity_scope: str = "batch",
    num_sequences: int = 1,
    valid: _torch.Tensor | None = None,
) -> tuple[_torch.Tensor, _torch.Tensor]:
    """Apply a capacity policy to a model's own top-k selection (SPEC.md).

    Args:
        probs: ``P`` [T, E], the router's probabilities over all experts (for ranking).
        topk_ids: the model's selection ``S`` as expert ids [T, k].
        topk_weights: the model's gate weights ``W`` [T, k] for those ids.
        capacity_factor: ``gamma``; ``None`` returns the selection unchanged.
        policy: one of ``score``, ``order``, ``reverse``, ``random``, ``expanded_drop``,
            ``reroute``.
        local_experts: experts local to every token (``expanded_drop``); default all.
        renormalize: rescale each token's kept weights to its original weight sum.
        reroute_rounds: proposal rounds of ``reroute``.
        seed: seed of the ``random`` policy.
        min_tokens: calls with fewer (valid) tokens are returned unchanged.
        min_capacity: lower bound of ``C``.
        capacity_align: ``C`` is rounded up to a multiple of this.
        capacity_scope: ``"batch"`` (one ``C`` for all rows) or ``"sequence"`` (rows are
            ``num_sequences`` contiguous equal-length sequences, each with its own ``C``).
        num_sequences: number of sequences for ``capacity_scope="sequence"``.
        valid: optional [T] bool mask; ``False`` rows are padding, count in no capacity and
            get no experts.

    Returns:
        ``(ids, weights)`` of shape [T, k'] (``k' = k`` except for ``expanded_drop``, whose
        extra columns hold the added pairs); dropped slots hold expert id ``E`` and weight 0.
    """
    from . import ops  # registers the capmoe ops

    checked = {
        name: config.validate(name, value)
        for name, value in (
            ("policy", policy),
            ("local_experts", local_experts),
            ("renormalize", renormalize),
            ("reroute_rounds", reroute_rounds),
            ("seed", seed),
            ("min_tokens", min_tokens),
            ("min_capacity", min_capacity),
            ("capacity_align", capacity_align),
            ("capacity_scope", capacity_scope),
        )
    }
    if capacity_factor is not None:
        capacity_factor = config.validate("capacity_factor", capacity_factor)
    local = checked["local_experts"]
    return ops.route_op(
        probs,
        topk_ids,
        topk_weights,
        capacity_factor,
        checked["policy"],
        None if local is None else list(local),
        checked["renormalize"],
        checked["reroute_rounds"],
        checked["seed"],
        checked["min_tokens"],
        checked["min_capacity"],
        checked["capacity_align"],
        checked["capacity_scope"],
        num_sequences,
        valid,
    )
