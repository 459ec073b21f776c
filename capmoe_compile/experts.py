"""Expert MLP forms and the ``capmoe::moe_experts`` op (dispatch + experts + combine).

An :class:`ExpertForm` says how one expert computes from its parameters: which tensor is the
(gate/up) projection and which the down projection, whether each is stored transposed, the
activation, and whether the MLP is gated (SwiGLU-like). The passes do not trust names: they
*find* the form by checking candidate forms against the model's own expert region on real and
random inputs (``passes/verify.py``: ``identify_form``).

``moe_experts(x, ids, weights, params, form)`` computes ``out[t] = sum_j weights[t, j] *
expert_{ids[t, j]}(x[t])``, skipping the sentinel id ``E``. Parameters are either stacked
(every tensor has a leading expert dimension) or per expert (``params`` is the concatenation
of each expert's tensors).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Rows per tile of batch-invariant expert arithmetic (``lowering/invariant.py``). One fixed
# value: a tile size chosen by shape would bring the shape dependence back. A multiple of 16
# (or 1): ATen's vectorised elementwise loops finish a tensor's tail in scalar code, so with
# other tiles an activation's bits could depend on a row's position in its tile. 64 measured
# fastest at prefill among 16/32/64 (python -m benchmarks.batch_invariance --tile N).
TILE = 64

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU (Primer, Nemotron-H)
}


@dataclasses.dataclass(frozen=True)
class ExpertForm:
    """How one expert computes. ``roles`` names each per-expert tensor, in ``params`` order.

    Roles: ``gate_up`` (fused, gated: split in halves), ``gate`` and ``up`` (separate, gated),
    ``up`` alone (plain MLP), ``down``; and biases ``b_<role>``. ``transposed`` lists the
    weight roles stored as [in, out] instead of nn.Linear's [out, in].
    """

    roles: tuple[str, ...]
    act: str
    transposed: tuple[str, ...] = ()
    gate_first: bool = True  # for gate_up: which half is the gate
    stacked: bool = True  # params carry a leading expert dim; else per-expert concatenation
    # Clamped / scaled gating (GPT-OSS): gate and up alternate columns of gate_up
    # (``interleaved``), the gate is clamped to at most ``limit`` and up to [-limit, limit],
    # the activation is ``g * sigmoid(alpha * g)`` (act "silu" only) and multiplies
    # ``up + up_shift``. The defaults are the plain gated MLP.
    interleaved: bool = False
    limit: float | None = None
    alpha: float = 1.0
    up_shift: float = 0.0
    # Softcapped SwiGLU (Inkling-2): ``cap(g, c) = tanh(g / c) * c``; the inner product is
    # ``cap(g, c_gate) * sigmoid(g) * cap(up, c_up)``, in float32, cast back. (c_gate, c_up)
    softcap: tuple[float, float] | None = None
    # How the weighted expert outputs are summed (bf16/fp16 layers; float32 is exact either
    # way): "float32": in float32, rounded once (the default); "dtype": as the common eager
    # loop does (``out.index_add_(0, rows, expert(x) * w)`` over experts in id order): each
    # product rounded to the layer's dtype and added in that dtype, experts in ascending id
    # order. The verifier picks the one that reproduces the layer's own rounding.
    combine: str = "float32"

    def __post_init__(self) -> None:
        # Decided once, a bool: Dynamo tracing a call that takes a form as an input would
        # make its float fields symbolic under dynamic=True (and restart to specialise them)
        # if the plain case read them.
        plain = (
            not self.interleaved
            and self.limit is None
            and self.alpha == 1.0
            and not self.up_shift
            and self.softcap is None
        )
        object.__setattr__(self, "_plain", plain)

    @property
    def plain_gate(self) -> bool:
        """No clamp, scale, shift, softcap or interleaving: what every lowering handles."""
        return self._plain

    @property
    def gated(self) -> bool:
        return "gate_up" in self.roles or "gate" in self.roles

    def to_str(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_str(s: str) -> ExpertForm:
        d = json.loads(s)
        return ExpertForm(
            roles=tuple(d["roles"]),
            act=d["act"],
            transposed=tuple(d["transposed"]),
            gate_first=d["gate_first"],
            stacked=d["stacked"],
            interleaved=d.get("interleaved", False),
            limit=d.get("limit"),
            alpha=d.get("alpha", 1.0),
            up_shift=d.get("up_shift", 0.0),
            softcap=tuple(d["softcap"]) if d.get("softcap") else None,
            combine=d.get("combine", "float32"),
        )

    def describe(self) -> str:
        kind = "swiglu" if self.gated and self.act == "silu" else ("glu" if self.gated else "mlp")
        bias = "+bias" if any(r.startswith("b_") for r in self.roles) else ""
        extra = []
        if self.interleaved:
            extra.append("interleaved")
        if self.limit is not None:
            extra.append(f"limit {self.limit:g}")
        if self.alpha != 1.0:
            extra.append(f"alpha {self.alpha:g}")
        if self.up_shift:
            extra.append(f"up+{self.up_shift:g}")
        if self.softcap:
            extra.append("softcap {:g}/{:g}".format(*self.softcap))
        return f"{kind}({self.act}){bias}" + (f"[{', '.join(extra)}]" if extra else "")

    def expert_params(self, params: list[torch.Tensor], e: int) -> dict[str, torch.Tensor]:
        n = len(self.roles)
        ps = [p[e] for p in params] if self.stacked else params[e * n : (e + 1) * n]
        return dict(zip(self.roles, ps, strict=True))

    def num_experts(self, params: list[torch.Tensor]) -> int:
        return params[0].shape[0] if self.stacked else len(params) // len(self.roles)

    def mlp(
        self,
        x: torch.Tensor,
        project: Callable[[str, torch.Tensor], torch.Tensor],
        *,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        inplace: bool = False,
        split_dim: int = -1,
    ) -> torch.Tensor:
        """The expert MLP of this form: the one definition every path runs.

        ``project(role, h)`` is a path's projection (``h @ W_role + b_role`` for one expert,
        a grouped GEMM over many, a transposed product, ...); the form decides which
        projections run and how they combine: a fused gate/up split in halves along
        ``split_dim`` (``gate_first`` says which half gates), or separate gate and up, the
        activation (``act``, default ``ACTIVATIONS[self.act]``) times up (``inplace``: into
        the activation's buffer), or a plain MLP; then down."""
        act = act or ACTIVATIONS[self.act]
        if "gate_up" in self.roles:
            h = project("gate_up", x)
            if self.interleaved:  # gate, up, gate, up, ... along split_dim
                pair = split_dim + 1 if split_dim >= 0 else split_dim
                a, b = h.unflatten(split_dim, (-1, 2)).unbind(pair)
            else:
                a, b = h.chunk(2, dim=split_dim)
            g, u = (a, b) if self.gate_first else (b, a)
        elif "gate" in self.roles:
            g, u = project("gate", x), project("up", x)
        else:
            return project("down", act(project("up", x)))
        if self.softcap is not None:
            cg, cu = self.softcap
            gf, uf = g.float(), u.float()
            inner = torch.tanh(gf / cg) * cg * torch.sigmoid(gf) * (torch.tanh(uf / cu) * cu)
            return project("down", inner.to(g.dtype))
        if not self.plain_gate:
            if self.limit is not None:
                g = g.clamp(max=self.limit)
                u = u.clamp(min=-self.limit, max=self.limit)
            a = g * torch.sigmoid(g * self.alpha) if self.alpha != 1.0 else act(g)
            return project("down", a * (u + self.up_shift) if self.up_shift else a * u)
        return project("down", act(g).mul_(u) if inplace else act(g) * u)

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """One expert on rows ``x`` [n, H]."""

        def lin(role: str, h: torch.Tensor) -> torch.Tensor:
            w = p[role]
            b = p.get("b_" + role)
            if not self.stacked:
                # per-expert modules are nn.Linear: the bias added inside the product, rounded
                # once, as nn.Linear does (the reference is all that runs these experts)
                if role not in self.transposed:
                    return F.linear(h, w, b)
                return h @ w if b is None else torch.addmm(b, h, w)
            # stacked: the product, then the bias, as the grouped kernels compute them
            y = h @ (w if role in self.transposed else w.t())
            return y if b is None else y + b

        return self.mlp(x, lin)


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
