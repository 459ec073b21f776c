"""``score`` (Token Drop, the paper's default): each expert keeps the ``C`` pairs of largest
``P[t, e]``; ties go to the smaller ``t`` (SPEC.md, "Policies")."""

from __future__ import annotations

import torch

from .registry import Policy, register_policy


def _score_dense(probs: torch.Tensor, seed: int) -> torch.Tensor:
    return probs


def _score_pairs(probs: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    return probs.gather(1, ids).float()


register_policy(
    Policy(
        "score",
        "keep the pairs of largest router probability (Token Drop)",
        _score_pairs,
        _score_dense,
    )
)
