"""Verification of a layer before it is rewritten: the expert region is run on the call's
real inputs and on trial selections, and an :class:`ExpertForm` must reproduce it on every
row of every trial (:func:`identify_form`). In bf16/fp16 the form is found in float32 and
confirmed in the layer's own dtype."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from .. import forms
from ..experts import moe_experts_reference
from ..forms import ExpertForm
from .region import Region, extract
from .reports import Unmatched


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _error(a, b) <= 1.0


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``a`` is from ``b``, in units of the tolerance (``<= 1``: close).

    The tolerance is relative to each element plus a floor relative to the largest element:
    in bf16/fp16 the floor is larger (0.1 of the largest, not 0.05), since a region that
    rounds its intermediates (expert outputs, weights) to 8 bits leaves errors of that order
    on the elements that cancel."""
    if a.shape != b.shape:
        return float("inf")
    fp32 = a.dtype == torch.float32 and b.dtype == torch.float32
    tol, floor = (1e-3, 0.05) if fp32 else (3e-2, 0.1)
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp_min(1e-6)
    return float(((a - b).abs() / (tol * (b.abs() + floor * scale))).max())


@dataclasses.dataclass
class _Trial:
    """One run of the expert region: inputs chosen by the verifier and what the region gave."""

    what: str
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # row i of this trial is row perm[i] of the real call


def _trials(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, E: int) -> list[_Trial]:
    """The selections a rewrite must reproduce, every row of each compared.

    Besides the call's real selection: a uniform random one; skewed ones that send every token
    to the same k experts (first and last), which is where a layer's own capacity, position-
    based dropping or expert-choice routing shows; the real selection in reversed and shuffled
    token order (an order-dependent layer shows there); and a half-overloaded selection whose
    first and last halves trade places.
    """
    T, k = ids.shape
    gen = torch.Generator().manual_seed(0)
    dev = ids.device

    def rand_w() -> torch.Tensor:
        return torch.rand(T, k, generator=gen).to(w.dtype).to(w.device) + 0.1

    def sel(rows: torch.Tensor) -> torch.Tensor:
        # contiguous, as a selection the router makes is (the region may ``view`` it)
        return rows.to(dev).to(ids.dtype).contiguous()

    first = torch.arange(k).expand(T, k)
    last = torch.arange(E - k, E).expand(T, k)
    in_lo = torch.arange(T)[:, None] < T // 2  # rows [0, T//2) vs [T//2, T), for any T
    half = torch.where(in_lo, first, last)
    swapped = torch.where(in_lo, last, first)
    skew_w = rand_w()  # one set of weights for the skewed trials: their rows are compared
    out = [
        _Trial("real", x, ids, w),
        _Trial("random", x, sel(torch.rand(T, E, generator=gen).argsort(-1)[:, :k]), rand_w()),
        _Trial("first", x, sel(first), skew_w),
        _Trial("last", x, sel(last), skew_w),
        _Trial("halves", x, sel(half), skew_w),
        _Trial("halves swapped", x, sel(swapped), skew_w),
    ]
    # activations well past any clamp or saturation of the expert's gating (GPT-OSS clamps
    # at 7): forms that differ only there are told apart
    out.append(_Trial("large", x * 32, ids, w))
    for what, perm in (
        ("reversed", torch.arange(T).flip(0)),
        ("shuffled", torch.randperm(T, generator=gen)),
    ):
        p = perm.to(x.device)
        out.append(_Trial(what, x[p], ids[p.to(dev)], w[p.to(w.device)], perm=p))
    return out


def _token_dependence(trials: dict[str, _Trial]) -> str | None:
    """Where a token's output depends on the other tokens' routing, say how it showed.

    The skewed trials give each token the same (x, ids, weights) in two calls that route the
    *other* tokens differently: all tokens on the first k experts vs only one half of them
    there, and likewise for the last k. A dropless layer computes those rows identically; a
    layer with its own capacity (or position-based dropping, or expert choice) does not. The
    reversed and shuffled trials catch layers whose output depends on token order.
    """
    T = trials["real"].x.shape[0]
    lo, hi = torch.arange(T // 2), torch.arange(T // 2, T)
    pairs = [
        ("first", "halves", lo, lo),
        ("first", "halves swapped", hi, hi),
        ("last", "halves", hi, hi),
        ("last", "halves swapped", lo, lo),
    ]
    for a, b, ra, rb in pairs:
        if len(ra) and not _close(trials[b].out[rb], trials[a].out[ra]):
            return (
                "the layer enforces its own capacity: a token's output changed when only other "
                "tokens' routing changed (its own capacity, position-based dropping or expert "
                "choice); rewriting it as dropless would change what it computes"
            )
    real = trials["real"].out
    for what in ("reversed", "shuffled"):
        t = trials[what]
        # the permuted trial's row i is real row perm[i]; recover perm from x's rows
        if not _close(t.out, real[t.perm]):
            return (
                f"the layer's output depends on token order (real selection, tokens {what}): "
                "it enforces its own capacity or position-based dropping"
            )
    return None


def identify_form(region: Region, values: dict[fx.Node, Any]) -> ExpertForm:
    """The expert form that reproduces the region on every row of every trial (``_trials``).

    Candidate forms are first screened on a few rows of the real selection (cheap), and the
    survivors are checked on every row of every trial: a layer that only misbehaves on late
    rows, on overloaded experts or in another token order cannot pass.

    In bf16/fp16 the form is decided in float32 (:func:`_upcast_trial`): the region and every
    candidate run on float32 copies of the call's tensors and parameters, so that rounding
    cannot hide the form (a layer matched in float32 is matched in bf16, with the same form).
    The chosen form is then confirmed in the real dtype (:func:`_confirm_in_dtype`).
    """
    x = values[region.x]
    if x.dtype in _LOW_FLOATS and _upcast_bytes(region, values) <= _UPCAST_LIMIT:
        sub32, values32 = _upcast_trial(region, values)
        try:
            form = _identify_in(region, values32, sub32)
        except (RuntimeError, TypeError):
            pass  # the region does not run in float32 (a dtype it insists on): as written
        else:
            return _confirm_in_dtype(region, values, values32, sub32, form)
    return _identify_in(region, values, extract(region))


# Dtypes whose expert forms are identified in float32, and the most float32 copies of a
# layer's tensors (bytes) made for it: beyond this (a very large layer) the form is identified
# in the layer's own dtype, at that dtype's tolerance.
_LOW_FLOATS = (torch.bfloat16, torch.float16)
_UPCAST_LIMIT = 4 << 30


def _upcast(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype in _LOW_FLOATS:
        return v.float()
    return v


def _upcast_bytes(region: Region, values: dict[fx.Node, Any]) -> int:
    vs = [values[n] for n in (region.x, region.weights, *region.roots)]
    return sum(4 * v.numel() for v in vs if isinstance(v, torch.Tensor) and v.dtype in _LOW_FLOATS)


def _upcast_trial(region: Region, values: dict[fx.Node, Any]):
    """The region as a float32 program, and float32 copies of the values it reads.

    The region's code may name the low dtype (Dynamo folds ``h.to(x.dtype)`` and
    ``zeros(..., dtype=x.dtype)`` into constants): every bf16/fp16 dtype constant of the
    extracted subgraph becomes float32, so the copy computes the same thing without rounding
    to 8 (or 11) bits on the way."""
    sub = extract(region)
    for n in sub.graph.nodes:
        n.args = fx.node.map_aggregate(n.args, _dtype_to_fp32)
        n.kwargs = fx.node.map_aggregate(n.kwargs, _dtype_to_fp32)
    sub.recompile()
    wanted = (region.x, region.ids, region.weights, *region.roots)
    return sub, {n: _upcast(values[n]) for n in wanted}


def _dtype_to_fp32(a: Any) -> Any:
    return torch.float32 if isinstance(a, torch.dtype) and a in _LOW_FLOATS else a


def _confirm_in_dtype(
    region: Region,
    values: dict[fx.Node, Any],
    values32: dict[fx.Node, Any],
    sub32: fx.GraphModule,
    form: ExpertForm,
) -> ExpertForm:
    """The form found in float32, confirmed in the real dtype on every trial, with the
    combine rounding (``ExpertForm.combine``) that reproduces the region's own more closely.

    Both the region and the form round their intermediates (the region, e.g., accumulates its
    experts' outputs in bf16; the form in float32): the form passes if it is within the
    dtype's tolerance of the region, or no farther from it than twice the region's own
    rounding (how far the region in the real dtype is from the region in float32)."""
    sub = extract(region)
    x, ids, w = values[region.x], values[region.ids], values[region.weights]
    roots = [values[r] for r in region.roots]
    roots32 = [values32[r] for r in region.roots]
    params = [values[p] for p in region.params]
    E = region.site.num_experts
    combines = [dataclasses.replace(form, combine=c) for c in ("dtype", "float32")]
    far = dict.fromkeys(combines, 0.0)
    noise = 0.0
    with torch.no_grad():
        for t in _trials(x, ids.long(), w, E):
            got = sub(t.x, t.ids.to(ids.dtype), t.weights, *roots)
            exact = sub32(_upcast(t.x), t.ids.to(ids.dtype), _upcast(t.weights), *roots32)
            noise = max(noise, _error(exact.to(got.dtype), got))
            for f in combines:
                ref = moe_experts_reference(t.x, t.ids, t.weights, params, f)
                far[f] = max(far[f], _error(ref, got))
    form = min(combines, key=far.__getitem__)  # ties: "dtype", as the eager loop rounds
    far = far[form]
    if far > max(1.0, 2.0 * noise):
        raise Unmatched(
            f"the expert form {form.describe()} reproduces the experts in float32 but not in "
            f"{x.dtype}: {far:.3g} tolerances from the region, whose own {x.dtype} rounding "
            f"is {noise:.3g}"
        )
    return form


def _identify_in(region: Region, values: dict[fx.Node, Any], sub: fx.GraphModule) -> ExpertForm:
    """:func:`identify_form` on the given values (the call's, or float32 copies) and
    region subgraph."""
    x, ids, w = values[region.x], values[region.ids], values[region.weights]
    roots = [values[r] for r in region.roots]
    params = [values[p] for p in region.params]
    E = region.site.num_experts
    # one [H] tensor beside stacked [E, ...] weights: a candidate for a shared vector role
    # (forms/shared_norm.py); the forms' check below decides what it is
    stacked_too = any(p.dim() >= 2 and p.shape[0] == E for p in params)
    shared_vector = [stacked_too and p.dim() == 1 and p.shape[0] == x.shape[1] for p in params]
    per_expert = any(
        (p.dim() == 0 or p.shape[0] != E) and not sv
        for p, sv in zip(params, shared_vector, strict=True)
    )
    if per_expert:
        stacked = _stack_per_expert(params, E)
        if stacked is None:
            shared = [tuple(p.shape) for p in params if p.dim() == 0 or p.shape[0] != E]
            own = [tuple(p.shape) for p in params if p.dim() > 0 and p.shape[0] == E]
            if own and shared:
                raise Unmatched(
                    f"the experts read tensors shared by every expert (shapes {shared}) beside "
                    f"their stacked [E, ...] weights (shapes {own}): a norm or projection "
                    "applied with every expert (e.g. a norm of each expert's output), which "
                    "no expert form reproduces"
                )
            raise Unmatched(
                "expert parameters are neither stacked [E, ...] tensors nor E modules' "
                f"tensors of one shape each (shapes {[tuple(p.shape) for p in params]})"
            )
    trials = {t.what: t for t in _trials(x, ids.long(), w, E)}
    with torch.no_grad():
        for t in trials.values():
            t.out = sub(t.x, t.ids.to(ids.dtype), t.weights, *roots)
    reason = _token_dependence(trials)
    if reason:
        raise Unmatched(reason)
    real = trials["real"]
    screen = torch.arange(min(x.shape[0], 16))
    passing: list[tuple[float, ExpertForm]] = []
    candidates = forms.candidates(
        stacked if per_expert else params, x.shape[1], region.expert_nodes
    )
    for form in candidates:
        if per_expert:  # the same roles, read off each expert's own tensors
            form = dataclasses.replace(form, stacked=False)
        try:
            if not _close(
                moe_experts_reference(x[screen], real.ids[screen], w[screen], params, form),
                real.out[screen],
            ):
                continue
            err = max(
                _error(moe_experts_reference(t.x, t.ids, t.weights, params, form), t.out)
                for t in trials.values()
            )
            if err <= 1.0:
                passing.append((err, form))
                if x.dtype == torch.float32:
                    break  # fp32 tells forms apart: the first that passes
        except RuntimeError:
            continue
    if passing:
        # in bf16 close forms (gelu / gelu-tanh) may both pass: the closest one
        return min(passing, key=lambda p: p[0])[1]
    known = "; ".join(f.doc for f in forms.families())
    raise Unmatched(f"no known expert form ({known}) reproduces the experts")


def _stack_per_expert(params: list[torch.Tensor], E: int) -> list[torch.Tensor] | None:
    """Per-expert parameters (``params`` holds E groups of n tensors, expert by expert) as n
    stacked ``[E, ...]`` tensors, for the candidate forms; None if they are not E groups of
    one shape each. A wrong grouping cannot pass: forms are checked on the tensors as given."""
    if not params or len(params) % E:
        return None
    n = len(params) // E
    groups = [params[e * n : (e + 1) * n] for e in range(E)]
    shapes = [tuple(p.shape) for p in groups[0]]
    if any([tuple(p.shape) for p in g] != shapes for g in groups):
        return None
    return [torch.stack([g[i] for g in groups]) for i in range(n)]
