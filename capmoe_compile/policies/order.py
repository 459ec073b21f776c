"""``order``: each expert keeps the first ``C`` tokens of ``S_e`` by token index (later tokens
dropped; SPEC.md, "Policies")."""

from __future__ import annotations

import torch

from .registry import Policy, register_policy


def _row_index(T: int, width: int, device) -> torch.Tensor:
    return torch.arange(T, device=device).view(-1, 1).expand(T, width)


def _order_dense(probs, seed):  # earlier rows first
    return -_row_index(probs.shape[0], probs.shape[1], probs.device)


def _order_pairs(probs, ids, seed):
    return -_row_index(ids.shape[0], ids.shape[1], ids.device)


register_policy(Policy("order", "keep the earliest tokens", _order_pairs, _order_dense))
