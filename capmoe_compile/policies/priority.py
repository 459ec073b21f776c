"""``priority``: Batch Prioritized Routing (Riquelme et al., "Scaling Vision with Sparse
Mixture of Experts", NeurIPS 2021, V-MoE): a token's priority is its largest router
probability ``max_e' P[t, e']``, and each expert past its capacity keeps the ``C`` tokens of
``S_e`` of highest priority; ties go to the smaller ``t`` (SPEC.md, "Policies"). Unlike
``score`` the key is the token's, not the pair's: a token the router is sure about keeps all
of its experts before an unsure token keeps any."""

from __future__ import annotations

import torch

from .registry import Policy, register_policy


def _priority(probs: torch.Tensor) -> torch.Tensor:
    """[T, 1]: each row's largest probability (float32)."""
    return probs.float().amax(-1, keepdim=True)


def _priority_dense(probs: torch.Tensor, seed: int) -> torch.Tensor:
    return _priority(probs).expand(probs.shape)


def _priority_pairs(probs: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    return _priority(probs).expand(ids.shape)


register_policy(
    Policy(
        "priority",
        "keep the tokens whose largest router probability is largest (Batch Prioritized Routing)",
        _priority_pairs,
        _priority_dense,
    )
)
