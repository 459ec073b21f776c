"""Random MoE layers, spelled the many ways people write them, with their own SPEC oracle.

A :class:`LayerSpec` combines a router spelling, a dispatch spelling and an expert form; a
:class:`GeneratedMoE` computes it in plain PyTorch, exactly as written (the model under test).
Independently of capmoe's passes, each layer also knows SPEC.md's view of itself:
``routing(x)`` gives the router probabilities ``P``, the model's selection ``S`` and gate
weights ``W``; ``experts(x, ids, weights)`` runs the experts on any assignment (sentinel ``E``
skipped), so :func:`oracle` gives what a capacity-aware layer must compute, through
``capmoe_compile.route``.

Some spellings are layers capmoe must *not* rewrite as dropless (``bmm_own_capacity`` drops
pairs past the model's own capacity): for those the only promise is "left as written", and the
differential check below treats a rewrite that changes the output as wrong. ``scaled_logits``
is a router whose ``P`` no named pattern identifies: it must be left as written too.

Used by ``tests/test_generator.py`` (a seeded subset in CI) and
``benchmarks/layer_generator.py`` (thousands).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = (
    "softmax_topk",  # P = softmax(logits); W, S = topk(P)
    "softmax_topk_renorm",  # ... W renormalised over the selected
    "softmax_topk_3d",  # the same over [B, S, E] scores, flattened after the top-k
    "softmax_max_top1",  # P = softmax; W, S = max(P, dim=-1) (Switch)
    "logits_topk_softmax",  # S = topk(logits); W = softmax over the selected (GPT-OSS)
    "sigmoid_topk_renorm",  # P = sigmoid; W, S = topk(P), renormalised, scaled
    "sigmoid_bias_topk",  # S = topk(sigmoid + bias); W = P at S, renormalised (DeepSeek-V3)
    "scaled_logits",  # S = topk(logits / tau); W = softmax over selected: P not identified
    # issue 14's spellings
    "softmax_bias_topk",  # S = topk(softmax + bias); W = P at S, renormalised (Ernie-4.5)
    "logits_bias_topk",  # S = topk(logits + bias); W = sigmoid(logits at S), renormalised
    "softmax_argmax_top1",  # S = argmax(P); W = P at S (GShard/Switch by argmax)
)
TOP1 = ("softmax_max_top1", "softmax_argmax_top1")
DISPATCHES = (
    "gather_einsum",  # per pair: gather the expert's weights, einsum
    "grouped_mm",  # sort pairs by expert, torch._grouped_mm with offsets, unsort
    "dense_onehot",  # every expert on every token, combined by a dense [T, E] weight matrix
    "expert_loop",  # Python loop over experts, masks instead of gathers (static shapes)
    "sorted_index_add",  # sort pairs, gather weights per row, index_add_ back
    "bmm_capacity",  # [E, cap, H] buffers with cap = T: never drops (dropless)
    "bmm_own_capacity",  # [E, cap, H] with the model's own cap: drops late pairs
    # issue 14's spellings: data-dependent shapes and loops, bridged by capmoe's compiles
    "where_loop",  # for e in range(E): torch.where(ids == e), index_add_ (stacked weights)
    "modulelist_where",  # the same over an nn.ModuleList of expert modules
    "hit_loop",  # transformers' eager experts loop over the experts hit (nonzero), sentinel skip
    "hit_loop_item",  # Nemotron-H's: nonzero().squeeze(-1), .item(), empty skip, no sentinel
)
# gptoss: interleaved gate/up, gate clamped to LIMIT, up to [-LIMIT, LIMIT],
# g * sigmoid(ALPHA * g) * (up + 1) (GPT-OSS); softcap: tanh-capped SwiGLU (Inkling-2)
FORMS = ("gate_up", "up_gate", "gate_and_up", "mlp", "gptoss", "softcap")
LIMIT, ALPHA, SOFTCAP = 0.8, 1.702, (4.0, 25.0)
# The generator's own table (not capmoe's ``experts.ACTIVATIONS``): its layers and oracle
# must not share code with what they test.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x) ** 2,
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    router: str
    dispatch: str
    form: str
    act: str
    bias: bool
    transposed: bool  # weights stored [E, in, out] instead of nn.Linear's [E, out, in]
    shared: bool  # a dense shared expert added outside the routed part
    E: int
    k: int
    H: int
    F: int
    dtype: str
    dynamic: bool
    seed: int

    @property
    def ident(self) -> str:
        return (
            f"{self.router}-{self.dispatch}-{self.form}-{self.act}{'-b' if self.bias else ''}"
            f"{'-t' if self.transposed else ''}{'-sh' if self.shared else ''}-E{self.E}k{self.k}"
            f"-{self.dtype}{'-dyn' if self.dynamic else ''}-s{self.seed}"
        )

    @property
    def expected_match(self) -> bool:
        """Whether SPEC lets capmoe rewrite this layer at all (not whether it does)."""
        return self.router != "scaled_logits" and self.dispatch != "bmm_own_capacity"


def random_spec(rng: random.Random, seed: int) -> LayerSpec:
    router = rng.choice(ROUTERS)
    dispatch = rng.choice(DISPATCHES)
    E = rng.choice((4, 6, 8, 16))
    k = 1 if router in TOP1 else rng.choice((1, 2, 2, 3, 4))
    k = min(k, E // 2)
    form = rng.choice(FORMS)
    act = rng.choice(tuple(ACTIVATIONS))
    return LayerSpec(
        router=router,
        dispatch=dispatch,
        form=form,
        act="silu" if form in ("gptoss", "softcap") else act,  # their gating is their own
        bias=rng.random() < 0.3,
        transposed=rng.random() < 0.5,
        shared=rng.random() < 0.2,
        E=E,
        k=k,
        H=rng.choice((16, 24, 32)),
        F=rng.choice((16, 32, 48)),
        # torch._grouped_mm has no fp32 meta kernel on CPU: that spelling is bf16 only
        dtype="bfloat16" if dispatch == "grouped_mm" or rng.random() < 0.15 else "float32",
        dynamic=rng.random() < 0.25,
        seed=seed,
    )


def specs(n: int, seed: int = 0) -> list[LayerSpec]:
    rng = random.Random(seed)
    return [random_spec(rng, seed * 1_000_003 + i) for i in range(n)]


class GeneratedMoE(nn.Module):
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

    def _route(self, x, xf):
        s = self.spec
        r = s.router
        if r == "softmax_topk_3d":
            w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), s.k, dim=-1)
            return ids.reshape(-1, s.k), w.reshape(-1, s.k)
        logits = self.gate(xf)
        if r in ("softmax_topk", "softmax_topk_renorm"):
            w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), s.k, dim=-1)
            if r == "softmax_topk_renorm":
                w = w / w.sum(dim=-1, keepdim=True)
            return ids, w.to(xf.dtype)
        if r == "softmax_max_top1":
            w, ids = torch.max(torch.softmax(logits, dim=-1), dim=-1)
            return ids.unsqueeze(-1), w.unsqueeze(-1)
        if r == "softmax_argmax_top1":
            probs = torch.softmax(logits, dim=-1)
            ids = torch.argmax(probs, dim=-1, keepdim=True)
            return ids, probs.gather(1, ids)
        if r == "softmax_bias_topk":
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            ids = torch.topk(probs + self.bias, s.k, dim=-1).indices
            w = probs.gather(1, ids)
            return ids, (w / w.sum(dim=-1, keepdim=True)).to(xf.dtype)
        if r == "logits_bias_topk":
            ids = torch.topk(logits.float() + self.bias, s.k, dim=-1).indices
            w = logits.float().gather(1, ids).sigmoid()
            return ids, (w / w.sum(dim=-1, keepdim=True)).to(xf.dtype)
        if r == "logits_topk_softmax":
            vals, ids = torch.topk(logits, s.k, dim=-1)
            return ids, torch.softmax(vals, dim=-1)
        if r == "scaled_logits":
            vals, ids = torch.topk(logits / 0.7, s.k, dim=-1)
            return ids, torch.softmax(vals, dim=-1)
        probs = torch.sigmoid(logits.float())
        if r == "sigmoid_topk_renorm":
            w, ids = torch.topk(probs, s.k, dim=-1)
        else:  # sigmoid_bias_topk: the bias shapes the selection only
            ids = torch.topk(probs + self.bias, s.k, dim=-1).indices
            w = probs.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
        return ids, w.to(xf.dtype)

    def _w(self, name: str) -> torch.Tensor:
        """A stacked weight as [E, in, out], whatever its storage."""
        w = getattr(self, name)
        return w if self.spec.transposed else w.transpose(1, 2)

    def _hidden(self, h_in: torch.Tensor, h_gate: torch.Tensor | None) -> torch.Tensor:
        return hidden_of(self.spec, h_in, h_gate)

    def _b(self, name: str, e: torch.Tensor | int | None = None):
        b = getattr(self, name, None)
        if b is None:
            return 0
        return b if e is None else b[e]

    def _gather_einsum(self, xf, ids, w):
        k = ids.shape[1]
        e = ids.reshape(-1)
        xs = xf.repeat_interleave(k, dim=0)
        h_in = torch.einsum("nh,nhf->nf", xs, self._w("w_in")[e]) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.einsum("nh,nhf->nf", xs, self._w("w_gate")[e]) + self._b("b_gate", e)
        h = self._hidden(h_in, h_gate)
        y = torch.einsum("nf,nfh->nh", h, self._w("w_out")[e]) + self._b("b_out", e)
        return (y.view(-1, k, xf.shape[1]) * w.unsqueeze(-1)).sum(dim=1)

    def _grouped_mm(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        e_sorted = flat[order]
        counts = torch.histc(flat.float(), bins=self.spec.E, min=0, max=self.spec.E - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # histc, as transformers: no graph break
        xs = xf[tok]

        def proj(name, inp):
            y = torch._grouped_mm(inp, self._w(name), offs=offs)
            return y + self._b("b" + name[1:], e_sorted)

        h_gate = proj("w_gate", xs) if self.spec.form == "gate_and_up" else None
        h = self._hidden(proj("w_in", xs), h_gate)
        y = proj("w_out", h) * w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(xf)
        return out.index_add(0, tok, y)

    def _dense_onehot(self, xf, ids, w):
        dense = torch.zeros(xf.shape[0], self.spec.E, dtype=w.dtype).scatter(1, ids, w)
        h_in = torch.einsum("th,ehf->etf", xf, self._w("w_in")) + self._bias3("b_in")
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.einsum("th,ehf->etf", xf, self._w("w_gate")) + self._bias3("b_gate")
        h = self._hidden(h_in, h_gate)
        y = torch.einsum("etf,efh->eth", h, self._w("w_out")) + self._bias3("b_out")
        return torch.einsum("te,eth->th", dense.to(y.dtype), y)

    def _bias3(self, name):
        b = getattr(self, name, None)
        return 0 if b is None else b[:, None, :]

    def _expert_loop(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e in range(self.spec.E):
            weight = (w * (ids == e)).sum(dim=-1, keepdim=True)
            out = out + weight * self._one_expert(e, xf)
        return out

    def _one_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return self._expert_rows(e, rows, self.w_in[e], self.w_out[e])

    def _expert_rows(self, e: int, rows, w_in_e, w_out_e) -> torch.Tensor:
        """Expert ``e`` on ``rows``, given its in and out weights as stored."""

        def lin(w):
            return w if self.spec.transposed else w.t()

        h_in = rows @ lin(w_in_e) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = rows @ self._w("w_gate")[e] + self._b("b_gate", e)
        return self._hidden(h_in, h_gate) @ lin(w_out_e) + self._b("b_out", e)

    def _where_loop(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e in range(self.spec.E):
            tok, slot = torch.where(ids == e)
            y = self._one_expert(e, xf[tok]) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _modulelist_where(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.expert_list):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, (expert(xf[tok]) * w[tok, slot, None]).to(out.dtype))
        return out

    def _hit_loop(self, xf, ids, w):
        return self.hit_experts(xf, ids, w)

    _hit_loop_item = _hit_loop

    def _sorted_index_add(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat)
        tok = order // k
        e = flat[order]
        xs = xf[tok]
        h_in = torch.bmm(xs.unsqueeze(1), self._w("w_in")[e]).squeeze(1) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.bmm(xs.unsqueeze(1), self._w("w_gate")[e]).squeeze(1)
            h_gate = h_gate + self._b("b_gate", e)
        h = self._hidden(h_in, h_gate)
        y = torch.bmm(h.unsqueeze(1), self._w("w_out")[e]).squeeze(1) + self._b("b_out", e)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(xf).index_add_(0, tok, y)

    def _bmm_capacity(self, xf, ids, w):
        return self._bmm(xf, ids, w, cap=xf.shape[0])

    def _bmm_own_capacity(self, xf, ids, w):
        T, k = ids.shape
        return self._bmm(xf, ids, w, cap=max(1, int(T * k / self.spec.E)))

    def _bmm(self, xf, ids, w, cap):
        T, k = ids.shape
        E, H = self.spec.E, xf.shape[1]
        hot = F.one_hot(ids, E)
        pos = (torch.cumsum(hot.reshape(T * k, E), 0).reshape(T, k, E) - 1) * hot
        pos = pos.sum(-1)
        slot = torch.where(pos < cap, ids * cap + pos, torch.full_like(ids, E * cap))
        buf = xf.new_zeros(E * cap + 1, H)
        buf = buf.index_copy(0, slot.reshape(-1), xf.repeat_interleave(k, 0))
        buf = buf[: E * cap].view(E, cap, H)
        h_in = torch.bmm(buf, self._w("w_in")) + self._bias3("b_in")
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.bmm(buf, self._w("w_gate")) + self._bias3("b_gate")
        y = torch.bmm(self._hidden(h_in, h_gate), self._w("w_out")) + self._bias3("b_out")
        y = torch.cat([y.reshape(E * cap, H), y.new_zeros(1, H)])
        return (y[slot.reshape(-1)].view(T, k, H) * w.unsqueeze(-1)).sum(dim=1)

    # ---- SPEC's view of the layer (independent of capmoe's passes) -------------------------

    def routing(self, x: torch.Tensor):
        """``(P, S, W)``: router probabilities over all experts ([T, E], float32), the model's
        own selection ([T, k] ids) and its gate weights ([T, k])."""
        xf = x.reshape(-1, x.shape[-1])
        ids, w = self._route(x, xf)
        r = self.spec.router
        logits = self.gate(xf)
        if r.startswith("sigmoid"):
            P = torch.sigmoid(logits.float())  # the model's own score, in float32
        elif r in ("softmax_topk_3d", "softmax_max_top1", "softmax_argmax_top1"):
            P = torch.softmax(logits, dim=-1)  # the model's own score, in its dtype (bf16 ties)
        elif r in ("softmax_topk", "softmax_topk_renorm", "softmax_bias_topk"):
            P = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:  # top-k of logits: P = softmax of them, for ranking only (SPEC), float32
            P = torch.softmax(logits.float(), dim=-1)
        return P.float(), ids, w

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


def hidden_of(spec: LayerSpec, h_in: torch.Tensor, h_gate: torch.Tensor | None) -> torch.Tensor:
    """The expert's hidden activation for ``spec``'s form, from its in (and gate) projection."""
    act = ACTIVATIONS[spec.act]
    form = spec.form
    if form == "gate_up":
        g, u = h_in.chunk(2, dim=-1)
        return act(g) * u
    if form == "up_gate":
        u, g = h_in.chunk(2, dim=-1)
        return act(g) * u
    if form == "gate_and_up":
        return act(h_gate) * h_in
    if form == "gptoss":
        g, u = h_in[..., ::2], h_in[..., 1::2]
        g, u = g.clamp(max=LIMIT), u.clamp(min=-LIMIT, max=LIMIT)
        return (u + 1) * (g * torch.sigmoid(g * ALPHA))
    if form == "softcap":
        g, u = h_in.float().chunk(2, dim=-1)
        c_g, c_u = SOFTCAP
        inner = torch.tanh(g / c_g) * c_g * torch.sigmoid(g) * (torch.tanh(u / c_u) * c_u)
        return inner.to(h_in.dtype)
    return act(h_in)


class _ListExpert(nn.Module):
    """Expert ``e`` of a generated layer as a module of its own (a copy of its weights), for
    the ``nn.ModuleList`` dispatch."""

    def __init__(self, owner: GeneratedMoE, e: int) -> None:
        super().__init__()
        self.spec = owner.spec
        for name in ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out"):
            p = getattr(owner, name, None)
            if p is not None:
                setattr(self, name, nn.Parameter(p[e].detach().clone()))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            w = getattr(self, name)
            b = getattr(self, "b" + name[1:], None)
            y = h @ (w if self.spec.transposed else w.t())
            return y if b is None else y + b

        gate = proj("w_gate", rows) if self.spec.form == "gate_and_up" else None
        return proj("w_out", hidden_of(self.spec, proj("w_in", rows), gate))


class _EagerConfig:
    _experts_implementation = "eager"


try:  # transformers' decorator: its eager loop is what capmoe's bridge rewrites
    from transformers.integrations.moe import use_experts_implementation
except ImportError:  # pragma: no cover - the hit_loop dispatches need transformers
    use_experts_implementation = None
_HitLoopExperts = _HitLoopItemExperts = None

if use_experts_implementation is not None:

    @use_experts_implementation
    class _HitLoopExperts(nn.Module):  # noqa: F811 - defined where transformers is
        """transformers' eager experts loop (this project's own spelling of it), on the
        generated layer's weights (shared with it)."""

        def __init__(self, config, owner: GeneratedMoE) -> None:
            super().__init__()
            self.num_experts = owner.spec.E
            self.w_in, self.w_out = owner.w_in, owner.w_out
            object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
            for e in hit:
                e = e[0]
                if e == self.num_experts:
                    continue
                slot, tok = torch.where(mask[e])
                y = self._owner._expert_rows(e, hidden_states[tok], self.w_in[e], self.w_out[e])
                y = y * top_k_weights[tok, slot, None]
                final.index_add_(0, tok, y.to(final.dtype))
            return final

    @use_experts_implementation
    class _HitLoopItemExperts(_HitLoopExperts):  # noqa: F811
        """Nemotron-H's spelling: ``.nonzero().squeeze(-1)`` read with ``.item()``, no sentinel
        skip, a skip of empty selections."""

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)
            with torch.no_grad():
                mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
                mask = mask.permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
            for e in hit:
                e = e.item()
                slot, tok = torch.where(mask[e])
                if tok.numel() == 0:
                    continue
                y = self._owner._expert_rows(e, hidden_states[tok], self.w_in[e], self.w_out[e])
                y = y * top_k_weights[tok, slot, None]
                final.index_add_(0, tok, y.to(final.dtype))
            return final.to(hidden_states.dtype)


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


@dataclasses.dataclass
class Outcome:
    spec: LayerSpec
    matched: bool
    reason: str = ""  # why capmoe left the layer as written
    wrong: str = ""  # empty unless compiled != eager (off) or != the oracle (on)

    @property
    def verdict(self) -> str:
        if self.wrong:
            return "wrong"
        return "matched" if self.matched else "refused"


POLICIES = ("score", "order", "reroute", "random")


class _PassesThenEager:
    """A backend: the capmoe passes, then the rewritten graph run eagerly. Every decision the
    passes make is exercised, without Inductor's compile time (``inductor=True`` adds it).
    Keeps the passes' reports."""

    def __init__(self, inductor: bool) -> None:
        from capmoe_compile.bridge import capture_context

        self.inductor = inductor
        self.reports: list = []
        # the capmoe backend's graph-break bridges (capture flags, transformers' eager loop)
        self.backend_ctx_ctor = capture_context

    def __call__(self, gm, example_inputs):
        from capmoe_compile.passes import run_passes

        self.reports += run_passes(gm, example_inputs, None)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, list(example_inputs))
        return gm.forward


def check(spec: LayerSpec, gamma: float = 0.5, inductor: bool = False) -> Outcome:
    """Differential check of one generated layer: compiled with capacity off == eager, and, if
    capmoe rewrote it, compiled with capacity on == :func:`oracle` for every policy in
    ``POLICIES`` (switched at run time, no recompile)."""
    from capmoe_compile import config

    torch._dynamo.reset()
    layer = GeneratedMoE(spec).eval()
    shapes = [(3, 9), (2, 12)] if spec.dynamic else [(3, 9)]  # odd T too
    inputs = [layer.example(b, s, seed=spec.seed + i) for i, (b, s) in enumerate(shapes)]
    backend = _PassesThenEager(inductor)
    with torch.no_grad():
        compiled = torch.compile(layer, backend=backend, dynamic=spec.dynamic or None)
        out = Outcome(spec, matched=False)
        for x in inputs:
            got, want = compiled(x), layer(x)
            if not close(got, want):
                err = (got.float() - want.float()).abs().max().item()
                out.wrong = f"capacity off: compiled != eager (max |diff| {err:.3g})"
        out.matched = any(r.matched for r in backend.reports)
        out.reason = "; ".join(sorted({r.reason for r in backend.reports if not r.matched}))
        if out.wrong or not out.matched:
            return out
        for policy in POLICIES:
            for x in inputs:
                with config.patch(capacity_factor=gamma, policy=policy):
                    got = compiled(x)
                want = oracle(layer, x, capacity_factor=gamma, policy=policy, min_tokens=2)
                if not close(got, want):
                    err = (got.float() - want.float()).abs().max().item()
                    out.wrong = f"capacity on ({policy}): compiled != oracle (max |diff| {err:.3g})"
                    return out
    torch._dynamo.reset()
    return out
