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

Issue 23's additions: capacity enforced in the router (``router_cap``: the gate weight of pairs
past the layer's own capacity zeroed, positions from a cumsum over the flat one-hot, per top-k
slot, or an argsort rank by expert or by weight; ``cap`` binding, moderate (not binding on the
check's own inputs, binding on others) or never (``C = T``)): SPEC's token-wise rule says such a
layer is left as written unless its cap can never bind, so ``expected_match`` is False and the
check expects eager with capacity on. A ``moderate`` cap that the check's own inputs push up to
``C = T`` never binds either: :meth:`GeneratedMoE.may_rewrite` judges the layer as calibrated,
and the check holds such a layer to the oracle like a ``never`` one. Dispatch by ``torch.split(rows, counts.tolist())``
(``split_tolist``, ``split_index_add``). bf16 models of several layers (:class:`ModelSpec`).
Configuration switches between calls of one compiled model (:class:`Step`,
:func:`switch_steps`). :func:`check` compiles with ``backend="capmoe"`` itself and with a
reference backend (Inductor, or Dynamo + AOT eager), and counts a capmoe failure where the
reference compiles as wrong.

Used by ``tests/test_generator.py`` (a seeded subset in CI) and
``benchmarks/layer_generator.py`` (thousands).
"""

from __future__ import annotations

import contextlib
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
    # issue 23's: per-expert chunks from a data-dependent split (graph breaks without capture)
    "split_tolist",  # sort pairs by expert, torch.split(rows, counts.tolist()), unsort by index
    "split_index_add",  # the same chunks, weighted and index_add_-ed back to their tokens
)
# Capacity enforced in the ROUTER (issue 23): the gate weight of every pair past the layer's own
# capacity zeroed, the experts then run on every pair. Spellings of the pair's position:
ROUTER_CAPS = (
    "cumsum_flat",  # cumsum over the flattened [T*k, E] one-hot (token-major queue)
    "cumsum_slot",  # cumsum per top-k slot, earlier slots first (GShard's priority)
    "sort_rank",  # rank within its expert from a stable argsort by expert id
    "sort_score",  # rank within its expert by gate weight (argsort by weight, then by expert)
)
# binding: C = T*k/(2E); moderate: the smallest quarter multiple of T*k/E that drops nothing on
# the check's own inputs (binds for other inputs); never: C = T (no expert can get more: dropless)
CAP_KINDS = ("binding", "moderate", "never")
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
    router_cap: str = ""  # one of ROUTER_CAPS: capacity enforced in the router, or none
    cap: str = ""  # one of CAP_KINDS, with router_cap

    @property
    def ident(self) -> str:
        rcap = f"+{self.router_cap}.{self.cap}" if self.router_cap else ""
        return (
            f"{self.router}{rcap}-{self.dispatch}-{self.form}-{self.act}"
            f"{'-b' if self.bias else ''}"
            f"{'-t' if self.transposed else ''}{'-sh' if self.shared else ''}-E{self.E}k{self.k}"
            f"-{self.dtype}{'-dyn' if self.dynamic else ''}-s{self.seed}"
        )

    @property
    def expected_match(self) -> bool:
        """Whether SPEC lets capmoe rewrite this layer at all (not whether it does): not an
        unidentified router, not the layer's own capacity in the dispatch, and not a capacity
        in the router that can bind (SPEC: token-wise routing is part of what a match
        proves). A router cap of ``C = T`` never binds: that layer is dropless."""
        own_cap = bool(self.router_cap) and self.cap != "never"
        return (
            self.router != "scaled_logits" and self.dispatch != "bmm_own_capacity" and not own_cap
        )


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
        **_router_cap_draw(random.Random(seed * 31 + 7)),
    )


ROUTER_CAP_SHARE = 0.15  # of random layers


def _router_cap_draw(rng: random.Random) -> dict[str, str]:
    if rng.random() >= ROUTER_CAP_SHARE:
        return {}
    return {"router_cap": rng.choice(ROUTER_CAPS), "cap": rng.choice(CAP_KINDS)}


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
        ids, w = self._route_dropless(x, xf)
        if self.spec.router_cap:
            w = self._router_capacity(ids, w)
        return ids, w

    # the moderate router cap, in sixteenths of T*k/E: set by ``calibrate_router_cap``
    cap_sixteenths = 24

    def _router_cap_value(self, T, k: int):
        E, kind = self.spec.E, self.spec.cap
        if kind == "never":
            return T  # no expert can hold more than T pairs: never binds
        if kind == "binding":
            return max(1, (T * k) // (2 * E))
        q = self.cap_sixteenths
        return (T * k * q + 16 * E - 1) // (16 * E)  # ceil(q/16 * T*k/E)

    def router_cap_can_bind(self, T: int) -> bool:
        """Whether the router's own cap drops a pair of *some* input of ``T`` tokens: ``C < T``.
        A token's k experts are distinct, so no expert gets more than ``T`` pairs: a cap of
        ``T`` or more (``never``, or a ``moderate`` one calibrated up to ``T``) never binds."""
        return bool(self.spec.router_cap) and self._router_cap_value(T, self.spec.k) < T

    def may_rewrite(self, T: int) -> bool:
        """Whether SPEC lets capmoe rewrite this layer on calls of ``T`` tokens (the layer as
        built and calibrated; :attr:`LayerSpec.expected_match` is the spec's intent): not an
        unidentified router, not the layer's own capacity in the dispatch, not a router cap
        that can bind at ``T`` (SPEC: token-wise routing is part of what a match proves)."""
        s = self.spec
        if s.router == "scaled_logits" or s.dispatch == "bmm_own_capacity":
            return False
        return not self.router_cap_can_bind(T)

    def _router_capacity(self, ids, w):
        """The layer's own capacity, in the router: pairs past position C in their expert's
        queue get weight 0 (every pair is still computed)."""
        T, k = ids.shape
        E = self.spec.E
        cap = self._router_cap_value(T, k)
        how = self.spec.router_cap
        if how == "cumsum_flat":
            hot = F.one_hot(ids, E).reshape(T * k, E)
            pos = (hot.cumsum(0) * hot).sum(-1).view(T, k)  # 1-based place in its queue
            return w * (pos <= cap)
        if how == "cumsum_slot":
            hot = F.one_hot(ids, E)
            seen = torch.zeros(E, dtype=hot.dtype)
            places = []
            for j in range(k):
                c = hot[:, j].cumsum(0) + seen
                places.append((c * hot[:, j]).sum(-1))
                seen = seen + hot[:, j].sum(0)
            return w.masked_fill(torch.stack(places, 1) > cap, 0)
        flat = ids.reshape(-1)
        if how == "sort_rank":
            order = torch.argsort(flat, stable=True)
        else:  # sort_score: best weight first within each expert
            by_w = torch.argsort(w.reshape(-1).float(), descending=True, stable=True)
            order = by_w[torch.argsort(flat[by_w], stable=True)]
        counts = F.one_hot(flat, E).sum(0)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(T * k) - starts[flat[order]]  # 0-based place within its expert
        place = torch.empty_like(rank).scatter(0, order, rank).view(T, k)
        return torch.where(place < cap, w, torch.zeros_like(w))

    def calibrate_router_cap(self, inputs) -> None:
        """For ``cap="moderate"``: the smallest cap (in sixteenths of T*k/E) that drops no pair
        of ``inputs``; a router cap that does not bind here but does for other inputs, unless
        the inputs' own load reaches ``T`` (then no cap below ``T`` spares them, the cap is
        ``T`` and never binds: :meth:`router_cap_can_bind` says so, and the layer is dropless)."""
        if self.spec.cap != "moderate":
            return
        q = 1
        with torch.no_grad():
            for x in inputs:
                ids, _ = self._route_dropless(x, x.reshape(-1, x.shape[-1]))
                T, k = ids.shape
                load = int(torch.bincount(ids.reshape(-1), minlength=self.spec.E).max())
                while (T * k * q + 16 * self.spec.E - 1) // (16 * self.spec.E) < load:
                    q += 1
        self.cap_sixteenths = q

    def _route_dropless(self, x, xf):
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

    def _split_tolist(self, xf, ids, w):
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.spec.E)
        rows = xf.repeat_interleave(k, dim=0)[order]
        chunks = torch.split(rows, counts.tolist())
        outs = [self._one_expert(e, r) for e, r in enumerate(chunks)]
        y = torch.empty_like(rows)
        y[order] = torch.cat(outs).to(y.dtype)
        return (y.view(T, k, -1) * w.unsqueeze(-1).to(y.dtype)).sum(1)

    def _split_index_add(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = F.one_hot(flat, self.spec.E).sum(0)
        chunks = xf[tok].split(counts.tolist(), dim=0)
        y = torch.cat([self._one_expert(e, r) for e, r in enumerate(chunks)])
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(xf).index_add_(0, tok, y.to(xf.dtype))

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


# ---- multi-layer models ---------------------------------------------------------------------

LOOPS = (
    "expert_loop",
    "where_loop",
    "modulelist_where",
    "hit_loop",
    "hit_loop_item",
    "split_tolist",
    "split_index_add",
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Two or more generated layers in sequence (``h = h + layer(h)``), all in one dtype (bf16
    in the generator's stream: issue 23's multi-layer bf16 models)."""

    layers: tuple[LayerSpec, ...]
    seed: int

    @property
    def ident(self) -> str:
        inner = ",".join(
            f"{s.router}{'+' + s.router_cap + '.' + s.cap if s.router_cap else ''}/{s.dispatch}"
            f"/{s.form}/E{s.E}k{s.k}"
            for s in self.layers
        )
        return f"model{len(self.layers)}[{inner}]-{self.dtype}-s{self.seed}"

    @property
    def dtype(self) -> str:
        return self.layers[0].dtype

    @property
    def dynamic(self) -> bool:
        return False

    @property
    def expected_match(self) -> bool:
        """Whether SPEC lets capmoe rewrite any of its layers."""
        return any(s.expected_match for s in self.layers)


def random_model(rng: random.Random, seed: int, dtype: str = "bfloat16") -> ModelSpec:
    """2 or 3 random layers of one width and dtype."""
    n = rng.choice((2, 2, 3))
    H = rng.choice((16, 24, 32))
    layers = []
    for i in range(n):
        s = random_spec(rng, seed * 10 + i)
        E = min(s.E, 8) if s.dispatch in LOOPS else s.E
        k = 1 if s.router in TOP1 else min(s.k, E // 2)
        layers.append(dataclasses.replace(s, H=H, E=E, k=k, dtype=dtype, dynamic=False))
    return ModelSpec(tuple(layers), seed)


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


Case = LayerSpec | ModelSpec

MODEL_EVERY = 50  # every this many cases in ``cases`` is a bf16 multi-layer model


def cases(n: int, seed: int = 0, model_every: int = MODEL_EVERY) -> list[Case]:
    """``specs(n, seed)`` with every ``model_every``-th one (offset 7) replaced by a bf16
    multi-layer model drawn from its own seeded stream."""
    out: list[Case] = list(specs(n, seed))
    for i in range(n):
        if model_every and i % model_every == 7 % model_every:
            out[i] = random_model(random.Random(seed * 1_000_003 + i), seed * 1_000_003 + i)
    return out


# ---- the differential check ---------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    spec: Case
    matched: bool
    reason: str = ""  # why capmoe left the layer as written
    wrong: str = ""  # empty unless compiled != eager (off) or != the oracle (on), or raised
    inductor: str = "aot_eager"  # what "Inductor" meant for this check: inductor or aot_eager
    reference_failed: str = ""  # the reference backend failed too: capmoe's failure not wrong
    forbidden_match: bool = False  # a layer SPEC says to leave as written was rewritten
    off_diff: float | None = None  # capmoe, capacity off: max |compiled - eager|
    reference_diff: float | None = None  # the reference backend's max |compiled - eager|
    steps: int = 0  # configuration states checked on the one compiled model
    layers_matched: tuple[bool, ...] = ()

    @property
    def verdict(self) -> str:
        if self.wrong:
            return "wrong"
        if self.reference_failed:
            return "both_failed"
        return "matched" if self.matched else "refused"


POLICIES = ("score", "order", "reroute", "random")
DEFAULTS = {"capacity_factor": None, "policy": "score", "renormalize": False, "reroute_rounds": 1}


@dataclasses.dataclass(frozen=True)
class Step:
    """One configuration state of a compiled model, reached between calls: a ``config.patch``
    around the call, per-layer ``configure`` overrides, ``exempt`` layers."""

    patch: tuple = ()  # (name, value) pairs
    configure: tuple = ()  # (layer index, ((name, value), ...)) pairs
    exempt: tuple = ()  # layer indices

    def effective(self, i: int, options: dict) -> dict:
        """Layer ``i``'s options, by SPEC/README precedence: config < options= < per-module."""
        eff = {**DEFAULTS, **dict(self.patch), **options}
        for j, over in self.configure:
            if j == i:
                eff.update(dict(over))
        if i in self.exempt:
            eff["capacity_factor"] = None
        return eff

    def describe(self) -> str:
        parts = [f"patch({', '.join(f'{k}={v!r}' for k, v in self.patch)})"]
        parts += [f"configure(layer {j}, {dict(o)})" for j, o in self.configure]
        parts += [f"exempt(layer {j})" for j in self.exempt]
        return " + ".join(parts)


def switch_steps(case: Case, gamma: float) -> tuple[list[Step], dict]:
    """The configuration states a check walks through on one compiled model, and the
    ``options=`` it compiles with: every policy of ``POLICIES`` by ``config.patch``, then a
    seeded random walk of switches (capacity off again, ``expanded_drop``, ``renormalize``,
    ``reroute_rounds``, another gamma, ``configure`` and ``exempt`` of a layer), ending off."""
    rng = random.Random(case.seed * 17 + 3)
    n_layers = len(case.layers) if isinstance(case, ModelSpec) else 1
    steps = [Step(patch=(("capacity_factor", gamma), ("policy", p))) for p in POLICIES]
    options = {"policy": rng.choice(POLICIES)} if rng.random() < 0.2 else {}

    def on(policy=None, **more):
        policy = policy or rng.choice(POLICIES)
        return (("capacity_factor", rng.choice((0.5, 0.75, 1.0, 1.25))), ("policy", policy)) + (
            tuple(more.items())
        )

    menu = [
        lambda: Step(),  # capacity off
        lambda: Step(patch=on("expanded_drop")),
        lambda: Step(patch=on(renormalize=True)),
        lambda: Step(patch=on("reroute", reroute_rounds=2)),
        lambda: Step(patch=on(), configure=((rng.randrange(n_layers), on()),)),
        lambda: Step(patch=on(), exempt=(rng.randrange(n_layers),)),
        lambda: Step(configure=((rng.randrange(n_layers), on()),)),
    ]
    for _ in range(3):
        steps.append(rng.choice(menu)())
    steps.append(Step())
    return steps, options


def _aot_eager(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


@contextlib.contextmanager
def inner_compiler(full: bool):
    """``backend="capmoe"`` as the user gets it (its own Dynamo context, options and passes);
    unless ``full``, with AOTAutograd + eager in place of Inductor's ``compile_fx``: every
    decision the passes make and the rewritten graph's functionalised trace are exercised,
    without Inductor's code generation (seconds per graph on CPU)."""
    if full:
        yield
        return
    import torch._inductor.compile_fx as cfx

    saved = cfx.compile_fx
    cfx.compile_fx = _aot_eager
    try:
        yield
    finally:
        cfx.compile_fx = saved


@contextlib.contextmanager
def _collect_reports(sink: list):
    import importlib

    explain = importlib.import_module("capmoe_compile.explain")  # the module, not the function
    explain._collecting.append(sink)
    try:
        yield
    finally:
        explain._collecting.remove(sink)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _layers_of(model: nn.Module) -> list[GeneratedMoE]:
    return list(model.layers) if isinstance(model, GeneratedModel) else [model]


def _matched_layers(model: nn.Module, sink: list) -> tuple[list[bool], list]:
    """Which generated layers capmoe rewrote (by their expert parameters), and every report."""
    from capmoe_compile.explain import _with_call_params

    layers = _layers_of(model)
    ptrs = [{p.data_ptr() for p in layer.parameters()} for layer in layers]
    matched = [False] * len(layers)
    reports, seen = [], set()
    for graph_reports, inputs in sink:
        if id(graph_reports) in seen:
            continue
        seen.add(id(graph_reports))
        for r in graph_reports:
            reports.append(r)
            if not r.matched:
                continue
            r = _with_call_params(r, inputs)
            hit = [i for i, ps in enumerate(ptrs) if any(p.data_ptr() in ps for p in r.params)]
            for i in hit or range(len(layers)):  # unattributed: count it for every layer
                matched[i] = True
    return matched, reports


def expected(
    model: nn.Module,
    x: torch.Tensor,
    got: torch.Tensor,
    step: Step,
    options: dict,
    matched: list[bool],
) -> torch.Tensor:
    """What SPEC says the compiled model computes in configuration ``step``: per layer, the
    oracle under its effective options where capmoe rewrote it (and SPEC allows it), the layer
    as written otherwise. A multi-layer model's layers are fed the compiled model's own hidden
    states (``got``), so that a routing tie broken differently upstream cannot cascade."""
    layers = _layers_of(model)

    def one(i: int, h: torch.Tensor) -> torch.Tensor:
        layer, eff = layers[i], step.effective(i, options)
        if _judged_by(layer, h, eff, matched[i]) != "oracle":
            return layer(h)
        return oracle(layer, h, min_tokens=2, **eff)

    if not isinstance(model, GeneratedModel):
        return one(0, x)
    hs = [x] + [got[i] + one(i, got[i]) for i in range(len(layers))]
    return torch.stack(hs)


def _tokens(x: torch.Tensor) -> int:
    return x.reshape(-1, x.shape[-1]).shape[0]


def _judged_by(layer: GeneratedMoE, h: torch.Tensor, eff: dict, matched: bool) -> str:
    """What SPEC holds layer ``layer``'s compiled output on input ``h`` to, in a configuration
    with effective options ``eff``: ``"oracle"`` (capacity on, capmoe rewrote it and may),
    ``"eager"`` (capacity off, or capmoe left it as written), or ``"eager: left as written"``
    (a layer SPEC forbids rewriting: capacity on must still equal eager)."""
    if not layer.may_rewrite(_tokens(h)):
        return "eager: left as written"
    if eff["capacity_factor"] is None or not matched:
        return "eager"
    return "oracle"


def _mismatch_label(model, inputs, step: Step, options: dict, matched: list[bool]) -> str:
    """What a compiled output that differs from :func:`expected` was held to, per layer: the
    SPEC oracle, eager, or eager for a layer SPEC says to leave as written (then a rewrite of
    it, not a wrong oracle, is the likely cause)."""
    layers = _layers_of(model)
    kinds = []
    for i, layer in enumerate(layers):
        eff = step.effective(i, options)
        got = {_judged_by(layer, x, eff, matched[i]) for x in inputs}
        kind = " / ".join(sorted(got))
        if "eager: left as written" in got and matched[i]:
            kind += " (yet capmoe rewrote it)"
        kinds.append(kind if len(layers) == 1 else f"layer {i}: {kind}")
    return "; ".join(kinds)


def _reference(model, inputs, eager, dynamic, inductor: bool, out: Outcome) -> None:
    """Compile ``model`` with the reference backend; its max |diff| from eager, or its failure,
    into ``out``."""
    diff = 0.0
    try:
        ref = torch.compile(model, backend="inductor" if inductor else "aot_eager", dynamic=dynamic)
        for x, want in zip(inputs, eager, strict=True):
            diff = max(diff, _max_diff(ref(x), want))
        out.reference_diff = diff
    except Exception as e:  # noqa: BLE001 - any failure of the reference is reported
        out.reference_failed = _short(e)


def check(
    case: Case,
    gamma: float = 0.5,
    inductor: bool = False,
    steps: list[Step] | None = None,
    options: dict | None = None,
) -> Outcome:
    """Differential check of one generated layer or model.

    1. The reference: ``backend="inductor"`` (``inductor=True``: always compiled first, its max
       |diff| from eager is the bar's reference) or Dynamo + AOTAutograd + eager
       (``"aot_eager"``: Dynamo's default capture, which decides what compiles, without
       Inductor's code generation; compiled only when capmoe fails, to tell a capmoe failure
       (wrong) from one the reference shares (``both_failed``)).
    2. ``backend="capmoe"`` (inner compiler Inductor's, or AOT eager: :func:`inner_compiler`):
       capacity off must equal eager, within ``max(2 x the reference's diff, 1e-5)`` with
       ``inductor=True`` (issue 23's bar) and at the dtype's tolerance (:func:`close`) with AOT
       eager (whose own diff is ~0). A multi-layer model's capacity-off output is compared end
       to end for the bar, and per layer (teacher-forced) at the dtype's tolerance.
    3. On the same compiled model, the configuration states of :func:`switch_steps`, switched
       between calls: each call must follow the new configuration (vs :func:`expected`) and
       never raise.

    A capmoe failure where the reference compiles is wrong; where the reference fails too it
    is ``both_failed`` (reported apart). ``steps`` and ``options`` replace the drawn ones."""
    from capmoe_compile import config, module_config

    torch._dynamo.reset()
    multi = isinstance(case, ModelSpec)
    model = (GeneratedModel(case) if multi else GeneratedMoE(case)).eval()
    shapes = [(3, 9), (2, 12)] if case.dynamic else [(3, 9)]  # odd T too
    inputs = [model.example(b, s, seed=case.seed + i) for i, (b, s) in enumerate(shapes)]
    for layer in _layers_of(model):
        layer.calibrate_router_cap(inputs)
    out = Outcome(case, matched=False, inductor="inductor" if inductor else "aot_eager")
    dynamic = case.dynamic or None
    if steps is None:
        steps, drawn = switch_steps(case, gamma)
        options = drawn if options is None else options
    options = options or {}
    with torch.no_grad():
        eager = [model(x) for x in inputs]
        # 2. capmoe, capacity off (1., the reference, first where its diff sets the bar)
        if inductor:
            _reference(model, inputs, eager, dynamic, inductor, out)
            torch._dynamo.reset()
        sink: list = []
        kwargs = {"options": options} if options else {}
        try:
            with inner_compiler(inductor), _collect_reports(sink):
                compiled = torch.compile(model, backend="capmoe", dynamic=dynamic, **kwargs)
                off = [compiled(x) for x in inputs]
        except Exception as e:  # noqa: BLE001
            if not inductor:  # does the reference compile it?
                torch._dynamo.reset()
                _reference(model, inputs, eager, dynamic, inductor, out)
            if not out.reference_failed:
                out.wrong = f"capmoe raised where {out.inductor} compiles: {_short(e)}"
            return out
        matched, reports = _matched_layers(model, sink)
        out.layers_matched = tuple(matched)
        out.matched = any(matched)
        out.reason = "; ".join(sorted({r.reason for r in reports if not r.matched}))
        out.forbidden_match = any(
            m and not any(layer.may_rewrite(_tokens(x)) for x in inputs)
            for m, layer in zip(matched, _layers_of(model), strict=True)
        )
        off_diff = max(_max_diff(g, w) for g, w in zip(off, eager, strict=True))
        out.off_diff = off_diff
        if inductor and out.reference_diff is not None:
            bar = max(2 * out.reference_diff, 1e-5)
            if off_diff > bar:
                tf = [
                    _max_diff(g, expected(model, x, g, Step(), options, matched))
                    for x, g in zip(inputs, off, strict=True)
                ]
                out.wrong = (
                    f"capacity off: max |compiled - eager| {off_diff:.3g} > bar {bar:.3g} "
                    f"(inductor's own {out.reference_diff:.3g}; per layer, fed the compiled "
                    f"hidden states: {max(tf):.3g})"
                )
                return out
        for x, g, want in zip(inputs, off, eager, strict=True):
            ref_out = expected(model, x, g, Step(), options, matched) if multi else want
            if not close(g, ref_out):
                out.wrong = (
                    f"capacity off: compiled != eager (max |diff| {_max_diff(g, ref_out):.3g})"
                )
                return out
        # 3. configuration switches on the same compiled model
        for step in steps:
            layers = _layers_of(model)
            try:
                with inner_compiler(inductor), config.patch(dict(step.patch)):
                    for j, over in step.configure:
                        module_config.configure(layers[j], **dict(over))
                    for j in step.exempt:
                        module_config.exempt(layers[j])
                    got = [compiled(x) for x in inputs]
            except Exception as e:  # noqa: BLE001
                out.wrong = f"raised after switching to {step.describe()}: {_short(e)}"
                return out
            finally:
                for layer in layers:
                    module_config.clear(layer)
            out.steps += 1
            for x, g in zip(inputs, got, strict=True):
                want = expected(model, x, g, step, options, matched)
                if not close(g, want):
                    out.wrong = (
                        f"{step.describe()}{' with options=' + str(options) if options else ''}: "
                        f"compiled != {_mismatch_label(model, [x], step, options, matched)} "
                        f"(max |diff| {_max_diff(g, want):.3g})"
                    )
                    return out
    torch._dynamo.reset()
    return out
