"""``reverse``: each expert keeps the last ``C`` tokens of ``S_e`` by token index (SPEC.md,
"Policies")."""

from __future__ import annotations

from .order import _row_index
from .registry import Policy, register_policy


def _reverse_dense(probs, seed):  # later rows first
    return _row_index(probs.shape[0], probs.shape[1], probs.device)


def _reverse_pairs(probs, ids, seed):
    return _row_index(ids.shape[0], ids.shape[1], ids.device)


register_policy(Policy("reverse", "keep the latest tokens", _reverse_pairs, _reverse_dense))
