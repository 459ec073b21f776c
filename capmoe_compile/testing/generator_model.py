"""A generated layer (:class:`GeneratedMoE`: its spec's router, dispatch and form), a model
of several (:class:`GeneratedModel`), and SPEC's oracle for them (:func:`oracle`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from capmoe_compile.testing.generator_dispatch import (
    DispatchSpellings,
    _EagerConfig,
    _HitLoopExperts,
    _HitLoopItemExperts,
    _ListExpert,
)
from capmoe_compile.testing.generator_routers import RouterSpellings
from capmoe_compile.testing.generator_spec import LayerSpec, ModelSpec


class GeneratedMoE(RouterSpellings, DispatchSpellings, nn.Module):
    """One generated MoE layer: ``[B, S, H] -> [B, S, H]``, computed as ``spec`` spells it."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        s = spec
        g = torch.Generator().manual_seed(s.seed)

        def rand(*shape, scale):
            return nn.Parameter(torch.randn(*shape, generator=g) * scale)

        self.gate = nn.Linear(s.H, s.E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(s.E, s.H, generator=g) * s.H**-0.5)
            # a shared direction in the router makes loads skewed, as trained routers' are
            self.direction = torch.randn(s.H, generator=g)
            self.direction /= self.direction.norm()
            self.gate.weight.add_(torch.linspace(1.5, -1.5, s.E)[:, None] * self.direction)
        if s.router in ("sigmoid_bias_topk", "logits_bias_topk"):
            self.register_buffer("bias", torch.randn(s.E, generator=g) * 0.5)
        if s.router == "softmax_bias_topk":
            self.register_buffer("bias", torch.randn(s.E, generator=g) * 0.05)
        gated_out = s.F if s.form in ("gate_and_up", "mlp") else 2 * s.F
        shapes = {"w_in": (gated_out, s.H), "w_out": (s.H, s.F)}
        if s.form == "gate_and_up":
            shapes["w_gate"] = (s.F, s.H)
        for name, (o, i) in shapes.items():
            shape = (s.E, i, o) if s.transposed else (s.E, o, i)
            setattr(self, name, rand(*shape, scale=i**-0.5))
            if s.bias:
                setattr(self, "b" + name[1:], rand(s.E, o, scale=0.1))
        if s.shared:
            self.shared = nn.Sequential(nn.Linear(s.H, s.F), nn.SiLU(), nn.Linear(s.F, s.H))
        if s.dispatch == "modulelist_where":
            self.expert_list = nn.ModuleList(_ListExpert(self, e) for e in range(s.E))
        if s.dispatch in ("hit_loop", "hit_loop_item"):
            if _HitLoopExperts is None:
                raise RuntimeError(f"{s.dispatch} needs transformers")
            cls = _HitLoopExperts if s.dispatch == "hit_loop" else _HitLoopItemExperts
            self.hit_experts = cls(_EagerConfig(), self)
        self.to(getattr(torch, s.dtype))

    # ---- the layer as written ------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        xf = x.reshape(-1, H)
        ids, w = self._route(x, xf)
        out = getattr(self, "_" + self.spec.dispatch)(xf, ids, w)
        out = out.view(B, S, H)
        if self.spec.shared:
            out = out + self.shared(x)
        return out

    # ---- SPEC's view of the layer (independent of capmoe's passes) -------------------------

    def experts(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``, sentinel ``E`` skipped, plus
        the shared expert: the layer on any assignment."""
        B, S, H = x.shape
        xf = x.reshape(-1, H)
        out = torch.zeros(xf.shape, dtype=torch.float32)
        for j in range(ids.shape[1]):
            for e in ids[:, j].unique().tolist():
                if e >= self.spec.E:
                    continue
                rows = (ids[:, j] == e).nonzero().squeeze(-1)
                y = self._one_expert(e, xf[rows]).float()
                out[rows] += w[rows, j].float().unsqueeze(-1) * y
        out = out.to(x.dtype).view(B, S, H)
        if self.spec.shared:
            out = out + self.shared(x)
        return out

    def example(self, batch: int, seq: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, seq, self.spec.H, generator=g) + 1.5 * self.direction
        return x.to(getattr(torch, self.spec.dtype))


def oracle(layer: GeneratedMoE, x: torch.Tensor, **route_options) -> torch.Tensor:
    """What the capacity-aware layer must compute (SPEC.md), via ``capmoe_compile.route``."""
    from capmoe_compile import route

    P, ids, w = layer.routing(x)
    ids2, w2 = route(P, ids, w, **route_options)  # W in the model's dtype, as the layer has it
    return layer.experts(x, ids2, w2)


def tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal at the dtype's tolerance, relative to the output's scale."""
    tol = tolerance(b.dtype)
    a, b = a.float(), b.float()
    scale = max(1.0, b.abs().max().item())
    return bool(((a - b).abs() <= tol * scale + tol * b.abs()).all())


def capacity_would_bind(layer: GeneratedMoE, x: torch.Tensor, gamma: float) -> bool:
    _, ids, _ = layer.routing(x)
    T, k = ids.shape
    cap = max(1, math.ceil(gamma * T * k / layer.spec.E))
    return bool(torch.bincount(ids.reshape(-1), minlength=layer.spec.E).max() > cap)


class GeneratedModel(nn.Module):
    """A :class:`ModelSpec`: returns every hidden state, stacked ([L + 1, B, S, H]), so that a
    check can feed each layer's oracle the compiled model's own input to that layer."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(GeneratedMoE(s) for s in spec.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = [x]
        for layer in self.layers:
            x = x + layer(x)
            hs.append(x)
        return torch.stack(hs)

    def example(self, batch: int, seq: int, seed: int) -> torch.Tensor:
        return self.layers[0].example(batch, seq, seed)
