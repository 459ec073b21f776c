"""``random``: each expert keeps a uniformly random ``C``-subset of ``S_e``, from a seeded
integer hash (no generator state, so the same in compiled graphs; SPEC.md, "Policies")."""

from __future__ import annotations

import torch

from .registry import Policy, register_policy


def _hash_scores(seed: int, rows: int, experts: int, device) -> torch.Tensor:
    """Seeded, device-independent pseudo-random int keys in [0, 2**31) for every (t, e).

    A small integer mixer whose products stay below 2**63, so it is exact on every backend
    and inside compiled graphs (no torch.Generator state to trace).
    """
    t = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    e = torch.arange(experts, device=device, dtype=torch.int64).view(1, -1)
    return _hash_keys(seed, t, e)


def _hash_keys(seed: int, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """:func:`_hash_scores`'s key of each (t, e) given as broadcastable int64 tensors (the
    selected pairs only: ``t`` [T, 1], ``e`` = the ids [T, k])."""
    m = 0x7FFFFFFF
    s = (int(seed) * 0x3C6EF372 + 0x1B873593) & m
    x = ((t + s) & m) * 0x2C1B3C6D + e * 0x297A2D39 + 0x165667B1
    x = x & m
    for mul in (0x5BD1E995, 0x2C1B3C6D):
        x = x ^ (x >> 15)
        x = (x * mul) & m
    return x ^ (x >> 16)


def _random_dense(probs, seed):
    T, E = probs.shape
    return _hash_scores(seed, T, E, probs.device)


def _random_pairs(probs, ids, seed):
    return _hash_keys(seed, torch.arange(ids.shape[0], device=ids.device).view(-1, 1), ids)


register_policy(Policy("random", "keep a seeded hash-random choice", _random_pairs, _random_dense))
