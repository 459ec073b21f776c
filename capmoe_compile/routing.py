"""The eager reference of SPEC.md: capacity, and the assignment a capacity policy gives.

Everything here is vectorised torch code over a dense ``[G, R, E]`` view of the routing
problem (``G`` capacity groups of ``R`` rows each: one group for ``capacity_scope="batch"``,
one per sequence for ``"sequence"``). The policies live in ``capmoe_compile/policies/``, one
file each, registered by name (``register_policy``); their one primitive is ``_rank_rows``:
the rank of every row within its expert column by a key, ties to the smaller row. A pair
policy is a choice of key (plus, for ``reroute``, a few parallel proposal rounds after it).

This module is the single source of the semantics. Fast paths are tested against it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction

import torch

# The policies register themselves when their package is imported; the names below are this
# module's API (``routing.Policy``, ``routing.register_policy``, ...) and the helpers other
# modules (replicas, distributed, tests) take from here.
from .policies import BUILTIN
from .policies.expanded_drop import _expanded_drop, _expanded_width  # noqa: F401
from .policies.random import _hash_keys, _hash_scores  # noqa: F401
from .policies.ranking import (  # noqa: F401
    _RADIX_MIN,
    _RADIX_PAD_FROM,
    _descending_u32,
    _keep_selected,
    _rank_rows,
)
from .policies.registry import (  # noqa: F401
    _REGISTRY,
    Kept,
    Policy,
    _every_row,
    get_policy,
    policy_names,
    register_policy,
    token_scale,
)
from .policies.reroute import _reroute, _reroute_after, _reroute_dense  # noqa: F401

SCOPES = ("batch", "sequence")


@functools.lru_cache(maxsize=64)
def _gamma_fraction(capacity_factor: float) -> Fraction:
    # gamma is read as the decimal number the user wrote: 1.1 is 11/10 exactly, so that
    # ceil(1.1 * 10 * 2 / 2) is 11 and not 12 through binary rounding.
    return Fraction(repr(float(capacity_factor)))


def capacity(
    num_tokens,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 1,
    capacity_align: int = 1,
):
    """``C = max(1, min_capacity, ceil(gamma * T * k / E))`` rounded up to ``capacity_align``.

    Exact integer arithmetic, so ``num_tokens`` may be an int, a SymInt (dynamic shapes) or an
    integer tensor (token counts known only at run time, e.g. with padding excluded).
    """
    g = _gamma_fraction(capacity_factor)
    num = num_tokens * (g.numerator * top_k)
    den = g.denominator * num_experts
    c = (num + (den - 1)) // den
    floor = max(1, int(min_capacity))
    if isinstance(c, torch.Tensor):
        c = c.clamp_min(floor)
    else:
        c = torch.sym_max(c, floor) if isinstance(c, torch.SymInt) else max(c, floor)
    a = int(capacity_align)
    if a > 1:
        c = (c + (a - 1)) // a * a
    return c


def renormalized(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``after`` (a row's weights once pairs were dropped or added) rescaled to the sum of
    ``before`` (the model's weights of that row); rows left with no weight stay as they are."""
    b = before.float().sum(-1, keepdim=True)
    a = after.float().sum(-1, keepdim=True)
    factor = torch.where(a != 0, b / torch.where(a != 0, a, 1.0), 1.0)
    return (after.float() * factor).to(after.dtype)


def output_width(
    top_k: int, num_experts: int, policy: str, local_experts: Sequence[int] | None
) -> int:
    """k' of :func:`route`'s outputs."""
    return get_policy(policy).output_width(top_k, num_experts, local_experts)


def widens(policy: str) -> bool:
    """Whether ``policy`` may give a token more than its ``k`` experts (a candidate policy,
    as ``expanded_drop``): its output is wider, and expert parallelism routes it on ranks."""
    return get_policy(policy).candidates is not None


def _check(probs, topk_ids, topk_weights, policy, capacity_scope, num_sequences, valid):
    if probs.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
        raise ValueError(
            "route expects probs [T, E], topk_ids [T, k] and topk_weights [T, k]; got "
            f"{tuple(probs.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[0] != probs.shape[0]:
        raise ValueError("probs and topk_ids disagree on T")
    get_policy(policy)  # raises on an unknown name
    if capacity_scope not in SCOPES:
        raise ValueError(f"capacity_scope={capacity_scope!r}: expected one of {SCOPES}")
    if capacity_scope == "sequence" and num_sequences < 1:
        raise ValueError("capacity_scope='sequence' needs num_sequences >= 1")
    if valid is not None and tuple(valid.shape) != (probs.shape[0],):
        raise ValueError(f"valid must have shape [T]={probs.shape[0]}, got {tuple(valid.shape)}")


def route_reference(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    capacity_factor: float | None,
    policy: str = "score",
    local_experts: Sequence[int] | None = None,
    renormalize: bool = False,
    reroute_rounds: int = 1,
    seed: int = 0,
    min_tokens: int = 0,
    min_capacity: int = 1,
    capacity_align: int = 1,
    capacity_scope: str = "batch",
    num_sequences: int = 1,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's capacity-aware assignment. See :func:`capmoe_compile.route` for the contract."""
    _check(probs, topk_ids, topk_weights, policy, capacity_scope, num_sequences, valid)
    T, E = probs.shape
    k = topk_ids.shape[1]
    ids = topk_ids.long()
    if capacity_factor is None:
        return ids.clone(), topk_weights.clone()
    if T == 0 or (valid is None and T < min_tokens):
        return _unchanged(ids, topk_weights, k, E, policy, local_experts)

    G = num_sequences if capacity_scope == "sequence" else 1
    if T % G:
        raise ValueError(f"T={T} rows do not split into num_sequences={G} equal sequences")
    rows_valid = None if valid is None else valid.bool()  # None: every row counts
    cap_g = _group_capacity(
        rows_valid, T, G, E, k, capacity_factor, min_capacity, capacity_align, probs.device
    )

    pol = get_policy(policy)
    if pol.candidates is None:
        kept_slot, dense = _keep_pairs(pol, probs, ids, rows_valid, cap_g, G, seed)
        out_ids = torch.where(kept_slot, ids, E)
        out_w = torch.where(kept_slot, topk_weights, torch.zeros_like(topk_weights))
        if pol.after is not None:
            step = Kept(probs, ids, topk_weights, rows_valid, kept_slot, dense, cap_g, G)
            out_ids, out_w = pol.after(step, out_ids, out_w, reroute_rounds)
    else:
        rows = _every_row(rows_valid, T, probs)
        out_ids, out_w = pol.candidates(probs, ids, topk_weights, rows, cap_g, G, local_experts)

    if renormalize:
        out_w = renormalized(topk_weights, out_w)

    if valid is not None and min_tokens > 0:
        # Data-dependent count: choose with where, no host sync.
        small = rows_valid.sum() < min_tokens
        same_ids, same_w = _unchanged(ids, topk_weights, k, E, policy, local_experts)
        out_ids = torch.where(small, same_ids, out_ids)
        out_w = torch.where(small, same_w, out_w)
    return out_ids, out_w


def _group_capacity(rows_valid, T, G, E, k, gamma, min_capacity, align, device) -> torch.Tensor:
    """``C`` of each of the ``G`` groups as a ``[G, 1, 1]`` tensor: exact ints when every row
    counts (``rows_valid`` None), computed from each group's real rows when padding is
    excluded."""
    R = T // G
    if rows_valid is None:
        cap = capacity(R, E, k, gamma, min_capacity, align)
        return torch.full((G, 1, 1), cap, dtype=torch.int64, device=device)
    counts = rows_valid.view(G, R).sum(1)
    return capacity(counts, E, k, gamma, min_capacity, align).view(G, 1, 1)


#: Size dispatch of the policies in :data:`PAIR_POLICIES` (``T * E`` cells, any ``G``). At
#: decode and small prefill sizes the cost is per op, not per element, and the dense ranking
#: (:func:`_rank_rows` over ``[G, R, E]``: about 8 ops) has fewer ops than the pair ranking
#: (:func:`_keep_selected`: about 25). Both are equal bit for bit (``tests/test_route_pairs.py``
#: runs both forms on both sides of the switches). Measured (CPU, one thread, thread time,
#: ``k`` = 2 and 8): the dense keep costs 0.43-0.63x the pairs' up to 4096 cells, 0.70-0.85x
#: at 8192 and 0.95-1.30x from 16384; ``reroute`` with the dense rounds 0.62-0.94x up to 8192
#: cells, 0.86-1.13x at 16384.
DENSE_CELLS = 8192


def _keep_pairs(policy: Policy, probs, ids, rows_valid, cap_g, G, seed):
    """``kept_slot`` [T, k] of a policy of :data:`PAIR_POLICIES`, and the dense ``(sel, keep)``
    [T, E] masks where the dense ranking computed it (None where the pair ranking did)."""
    T, E = probs.shape
    if T * E > DENSE_CELLS:
        # Ranked on the T*k selected pairs (_keep_selected): cost grows with T*k, not T*E.
        key = policy.pair_key(probs, ids, seed)
        kept = _keep_selected(key, ids, rows_valid, cap_g, G, E)
        return kept, None
    sel = torch.zeros(T, E, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
    if rows_valid is not None:
        sel &= rows_valid[:, None]
    view = (G, T // G, E)
    key = policy.dense_key(probs, seed).reshape(view)
    keep = sel & (_rank_rows(key, sel.view(view)) < cap_g).reshape(T, E)
    return keep.gather(1, ids), (sel, keep)


#: The config knobs that are arguments of :func:`route_reference`, under the same names.
ROUTE_KNOBS = (
    "capacity_factor",
    "policy",
    "local_experts",
    "renormalize",
    "reroute_rounds",
    "seed",
    "min_tokens",
    "min_capacity",
    "capacity_align",
    "capacity_scope",
)


def route_with_options(probs, topk_ids, topk_weights, opts, **overrides):
    """:func:`route_reference` with its knobs taken from a resolved options dict
    (``capmoe_compile.config.resolve``); ``overrides`` win over ``opts``."""
    kw = {name: opts[name] for name in ROUTE_KNOBS}
    kw.update(overrides)
    return route_reference(probs, topk_ids, topk_weights, **kw)


def _unchanged(ids, weights, k, E, policy, local_experts):
    width = output_width(k, E, policy, local_experts)
    T = ids.shape[0]
    if width == k:
        return ids.clone(), weights.clone()
    return (
        torch.cat([ids, ids.new_full((T, width - k), E)], 1),
        torch.cat([weights, weights.new_zeros(T, width - k)], 1),
    )


#: The built-in policies, the paper's and the first ones of this project, in registration
#: order (``policy_names()`` also lists those registered since: ``policies.EXTRA`` and any
#: user's). Sweeps and the calibration search iterate over these.
POLICIES: tuple[str, ...] = BUILTIN
#: The built-in pair policies (ranked per selected pair).
PAIR_POLICIES = tuple(n for n in POLICIES if get_policy(n).candidates is None)
