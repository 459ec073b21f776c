"""The policy registry: what a capacity policy is (:class:`Policy`), the registered ones by
name, and what a pair policy's ``after`` step is handed (:class:`Kept`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Policy:
    """A capacity policy: which pairs an expert past its capacity keeps (SPEC.md).

    A *pair* policy ranks the selected pairs of each expert by a key and keeps the ``C`` with
    the largest keys: ``pair_key(probs [T, E], ids [T, k], seed) -> [T, k]`` ranks the pairs,
    ``dense_key(probs, seed) -> [T, E]`` the same key for every (row, expert) cell (the dense
    ranking used at small sizes; both must agree on the selected cells). ``after`` runs on the
    kept pairs (``reroute``'s proposal rounds). A *candidate* policy (``candidates``) chooses
    among more pairs than the selection (``expanded_drop``: every local expert of every row)
    and may give a token more than ``k`` experts: ``width`` says how many. ``copy_form`` names
    the form of its ``after`` or ``candidates`` step over redundant expert copies
    (:func:`capmoe_compile.replicas.route_replicas`): ``"proposal_rounds"`` (Token Reroute's
    rounds) or ``"local_expansion"`` (every local copy offered); None: the step has no copy
    form (a pair policy without ``after`` needs none).

    Register a new one with :func:`register_policy`; ``docs/extending.md`` has the recipe."""

    name: str
    doc: str
    pair_key: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    dense_key: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    after: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    candidates: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    width: Callable[[int, int, Sequence[int] | None], int] | None = None
    copy_form: str | None = None

    def __post_init__(self) -> None:
        pair = self.pair_key is not None and self.dense_key is not None
        if pair == (self.candidates is not None):
            raise ValueError(
                f"policy {self.name!r}: give pair_key and dense_key (a pair policy) or "
                "candidates (a candidate policy), not both"
            )

    def output_width(self, top_k: int, num_experts: int, local_experts=None) -> int:
        return top_k if self.width is None else self.width(top_k, num_experts, local_experts)


_REGISTRY: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    """Add ``policy`` to the policies ``config.policy`` accepts (by its name)."""
    if policy.name in _REGISTRY:
        raise ValueError(f"a policy named {policy.name!r} is already registered")
    _REGISTRY[policy.name] = policy
    return policy


def policy_names() -> tuple[str, ...]:
    """The registered policies, in registration order."""
    return tuple(_REGISTRY)


def get_policy(name: str) -> Policy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy={name!r}: expected one of {', '.join(_REGISTRY)}") from None


@dataclasses.dataclass
class Kept:
    """What a pair policy kept, for its ``after`` step."""

    probs: torch.Tensor
    ids: torch.Tensor
    topk_weights: torch.Tensor
    rows_valid: torch.Tensor | None
    kept_slot: torch.Tensor  # [T, k]
    dense: tuple[torch.Tensor, torch.Tensor] | None  # (sel, keep) [T, E] where ranked densely
    cap_g: torch.Tensor
    G: int


def _every_row(rows_valid: torch.Tensor | None, T: int, like: torch.Tensor) -> torch.Tensor:
    """``rows_valid`` [T], or all True where it is None (every row counts)."""
    if rows_valid is not None:
        return rows_valid
    return torch.ones(T, dtype=torch.bool, device=like.device)


def token_scale(probs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SPEC's per-token scale ``W / P`` of the selected pairs, or 1 where they disagree."""
    p = probs.float().gather(1, ids)
    w = weights.float()
    ratio = w / p.clamp_min(torch.finfo(torch.float32).tiny)
    eps = max(torch.finfo(probs.dtype).eps, torch.finfo(weights.dtype).eps)
    tol = max(1e-5, 8 * eps)
    hi, lo = ratio.amax(-1), ratio.amin(-1)
    ok = (p > 0).all(-1) & ((hi - lo) <= tol * hi.abs())
    return torch.where(ok, ratio.mean(-1), torch.ones_like(hi))
