"""The ``capmoe::moe_experts`` op (dispatch + experts + combine) and its eager reference.

An :class:`ExpertForm` (``forms/``: the form families' registry) says how one expert computes
from its parameters: which tensor is the (gate/up) projection and which the down projection,
whether each is stored transposed, the activation, and whether the MLP is gated (SwiGLU-like),
clamped, softcapped, ... . The passes do not trust names: they
*find* the form by checking candidate forms against the model's own expert region on real and
random inputs (``passes/verify.py``: ``identify_form``).

``moe_experts(x, ids, weights, params, form)`` computes ``out[t] = sum_j weights[t, j] *
expert_{ids[t, j]}(x[t])``, skipping the sentinel id ``E``. Parameters are either stacked
(every tensor has a leading expert dimension) or per expert (``params`` is the concatenation
of each expert's tensors).
"""

from __future__ import annotations

import torch

from .forms import ACTIVATIONS, ExpertForm  # noqa: F401 - re-exported: experts.ExpertForm

# Rows per tile of batch-invariant expert arithmetic (``lowering/invariant.py``). One fixed
# value: a tile size chosen by shape would bring the shape dependence back. A multiple of 16
# (or 1): ATen's vectorised elementwise loops finish a tensor's tail in scalar code, so with
# other tiles an activation's bits could depend on a row's position in its tile. 64 measured
# fastest at prefill among 16/32/64 (python -m benchmarks.batch_invariance --tile N).
TILE = 64


def moe_experts_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: ExpertForm,
    tile: int = 0,
) -> torch.Tensor:
    """Eager reference: loop over experts, gather their rows, weighted scatter-add back.

    ``tile > 0``: each expert's rows go through the expert in zero-filled tiles of exactly
    ``tile`` rows, so a row's result does not depend on its group's size (batch invariance,
    ``lowering/invariant.py``)."""
    E = form.num_experts(params)
    in_dtype = form.combine == "dtype"  # see ExpertForm.combine
    acc = x.dtype if in_dtype else torch.float32
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    flat_ids = ids.reshape(-1)
    flat_w = weights.reshape(-1)
    k = ids.shape[1]
    for e in range(E):
        pos = (flat_ids == e).nonzero().squeeze(-1)
        if pos.numel() == 0:
            continue
        rows = pos // k
        y = _apply_tiled(form, x[rows], form.expert_params(params, e), tile)
        out.index_add_(0, rows, (y.float() * flat_w[pos].float()[:, None]).to(acc))
    return out.to(x.dtype)


def combine_rows(
    rows: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, form: ExpertForm, dtype
) -> torch.Tensor:
    """``sum_j weights[t, j] * rows[t, j]`` over the kept pairs, rounded as ``form.combine``
    says (:class:`ExpertForm`): ``rows`` [T, k, H] in token order, ``keep`` [T, k, 1]. For
    "dtype" the products are rounded to ``dtype`` and added in it, pair 0 first: each token's
    pairs must come in ascending expert id order (:func:`ascending_experts`)."""
    prod = torch.where(keep, rows.float() * weights.float()[:, :, None], 0.0)
    if form.combine != "dtype" or dtype == torch.float32:
        return prod.sum(1).to(dtype)
    prod = prod.to(dtype)
    out = prod[:, 0]
    for j in range(1, prod.shape[1]):
        out = (out.float() + prod[:, j].float()).to(dtype)
    return out


def ascending_experts(ids: torch.Tensor) -> torch.Tensor:
    """Each token's pair positions ([T, k]) in ascending expert id order (the order an eager
    per-expert loop adds them in; the sentinel id, the largest, last)."""
    return torch.argsort(ids, dim=1, stable=True)


def _apply_tiled(form: ExpertForm, rows: torch.Tensor, p, tile: int) -> torch.Tensor:
    if tile <= 0:
        return form.apply(rows, p)
    buf = rows.new_empty(tile, rows.shape[1])  # one buffer: every tile has one address too
    outs = []
    for s in range(0, rows.shape[0], tile):
        n = min(tile, rows.shape[0] - s)
        buf[:n] = rows[s : s + n]
        buf[n:] = 0
        outs.append(form.apply(buf, p)[:n])
    return torch.cat(outs)


@torch.library.custom_op("capmoe::moe_experts", mutates_args=())
def moe_experts_op(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: str,
    tile: torch.Tensor | None = None,
) -> torch.Tensor:
    t = 0 if tile is None else int(tile)
    return moe_experts_reference(x, ids, weights, params, ExpertForm.from_str(form), t)


@moe_experts_op.register_fake
def _moe_experts_fake(x, ids, weights, params, form, tile=None):
    return torch.empty_like(x)
