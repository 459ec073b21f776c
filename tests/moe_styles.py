"""Plain-PyTorch MoE layers written the ways other code bases write them, for the coverage
benchmark (``benchmarks/coverage.py``) and ``tests/test_families.py``.

Each style is an ``nn.Module`` taking hidden states ``[B, S, H]`` and returning ``[B, S, H]``.
They are this project's own code, written after the published descriptions of each style (not
copied). Every style also carries its SPEC.md oracle: the module routes through
``self._route(P, ids, W)``, which is the identity unless :func:`oracle` sets ``route_fn``
(Dynamo specialises on ``route_fn is None``: the compiled graph has no trace of it). With the
oracle set, ``capmoe_compile.route`` turns the module's own selection ``S`` (ids) and gate
weights ``W`` into SPEC's assignment; a dropped pair keeps its expert id with weight 0, so it
contributes nothing (for ``llama4_sigmoid`` the weight scales the expert's input, and the
experts have no bias, so a zero input gives a zero output). ``P`` is stated per style
(``p_rule``) by SPEC.md's rules. Layers that enforce their own capacity (``own_capacity``) have
no capacity-on oracle: SPEC.md says they are left as written.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, FFN, NUM_EXPERTS, TOP_K = 32, 64, 8, 2
BATCH, SEQ = 2, 16


class _Style(nn.Module):
    own_capacity = False
    p_rule = "softmax over experts"

    def __init__(self):
        super().__init__()
        self.route_fn: Callable | None = None

    def _route(self, probs, ids, weights):
        if self.route_fn is None:
            return ids, weights
        return self.route_fn(probs, ids, weights)


def _stacked(E, a, b, std):
    return nn.Parameter(torch.randn(E, a, b) * std)


# --------------------------------------------------------------------------------------------


class _Expert(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.w1 = nn.Linear(h, f, bias=False)
        self.w3 = nn.Linear(h, f, bias=False)
        self.w2 = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListWhere(_Style):
    """transformers-4 Mixtral: a Python loop over ``nn.ModuleList`` experts, ``torch.where``
    on a one-hot expert mask, ``index_add_`` back into token order."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.experts = nn.ModuleList(_Expert(h, f) for _ in range(E))

    def forward(self, x):
        B, S, H = x.shape
        x = x.view(-1, H)
        logits = self.gate(x)
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        sel, w = self._route(probs, sel, w)
        w = w.to(x.dtype)
        out = torch.zeros((B * S, H), dtype=x.dtype, device=x.device)
        mask = F.one_hot(sel, num_classes=self.E).permute(2, 1, 0)  # [E, k, T]
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            cur = x[None, tok].reshape(-1, H)
            y = self.experts[e](cur) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out.reshape(B, S, H)


class GShardTop2(_Style):
    """GShard / DeepSpeed top-2: two ``argmax`` picks, position in expert by ``cumsum``,
    its own capacity (tokens past it dropped), dispatch/combine tensors ``[T, E, C]``,
    stacked GELU experts by ``einsum``. ``drop_tokens = False`` is DeepSpeed's dropless
    variant (:class:`GShardTop2Dropless`)."""

    own_capacity = True
    p_rule = "- (the layer enforces its own capacity)"
    drop_tokens = True

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=2, capacity_factor=1.0):
        super().__init__()
        self.E, self.k, self.cf = E, 2, capacity_factor
        self.wg = nn.Linear(h, E, bias=False)
        self.w_in = _stacked(E, h, f, h**-0.5)
        self.w_out = _stacked(E, f, h, f**-0.5)
        self.exp_counts = None

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        cap = max(4, math.ceil(T * self.k / self.E * self.cf)) if self.drop_tokens else T
        i1 = torch.argmax(gates, dim=1)
        m1 = F.one_hot(i1, self.E)
        i2 = torch.argmax(logits.masked_fill(m1.bool(), float("-inf")), dim=1)
        m2 = F.one_hot(i2, self.E)
        loc1 = torch.cumsum(m1, dim=0) - 1
        loc2 = torch.cumsum(m2, dim=0) - 1 + m1.sum(dim=0, keepdim=True)
        if self.drop_tokens:
            m1 = m1 * (loc1 < cap)
            m2 = m2 * (loc2 < cap)
        else:
            self.exp_counts = (m1 + m2).sum(dim=0)
        loc1 = (loc1 * m1).sum(dim=1)
        loc2 = (loc2 * m2).sum(dim=1)
        g1 = (gates * m1).sum(dim=1)
        g2 = (gates * m2).sum(dim=1)
        denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        c1 = g1[:, None, None] * m1[:, :, None] * F.one_hot(loc1, cap)[:, None, :]
        c2 = g2[:, None, None] * m2[:, :, None] * F.one_hot(loc2, cap)[:, None, :]
        combine = c1 + c2  # [T, E, C]
        dispatch = combine.bool().to(x.dtype)
        xe = torch.einsum("tec,th->ech", dispatch, x)
        ye = torch.einsum(
            "ecf,efh->ech", F.gelu(torch.einsum("ech,ehf->ecf", xe, self.w_in)), self.w_out
        )
        out = torch.einsum("tec,ech->th", combine.to(x.dtype), ye)
        return out.reshape(B, S, H)


class BSEGroupedMM(_Style):
    """A token-choice router on ``[B, S, E]`` scores (top-k over the last dim of a 3-D tensor),
    stacked SwiGLU weights, tokens sorted by expert and ``torch._grouped_mm`` with offsets.
    bf16 (``dtype``): Dynamo's fake kernel of ``torch._grouped_mm`` accepts bf16 only, though
    the CPU kernel also runs fp32."""

    dtype = torch.bfloat16

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.router = nn.Linear(h, E, bias=False, dtype=self.dtype)
        self.w13 = nn.Parameter((torch.randn(E, h, 2 * f) * h**-0.5).to(self.dtype))
        self.w2 = nn.Parameter((torch.randn(E, f, h) * f**-0.5).to(self.dtype))

    def forward(self, x):
        B, S, H = x.shape
        scores = self.router(x).float().softmax(dim=-1)  # [B, S, E]
        w, ids = scores.topk(self.k, dim=-1)  # [B, S, k]
        w = w / w.sum(-1, keepdim=True)
        ids2, w2 = self._route(
            scores.reshape(-1, self.E), ids.reshape(-1, self.k), w.reshape(-1, self.k)
        )
        flat_ids = ids2.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        tok = order // self.k
        xs = x.reshape(-1, H)[tok]
        counts = torch.bincount(flat_ids, minlength=self.E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h13 = torch._grouped_mm(xs, self.w13, offs=offs)
        g, u = h13.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(g) * u, self.w2, offs=offs)
        ys = ys * w2.reshape(-1)[order, None].to(ys.dtype)
        out = torch.zeros(B * S, H, dtype=x.dtype).index_add(0, tok, ys)
        return out.reshape(B, S, H)


class Lucidrains3D(_Style):
    """lucidrains-style gating on ``[b, n, e]``: top-1 then top-2 over 3-D gates, normalised
    pair weights, per-batch position by ``cumsum`` over ``n``, its own capacity from
    ``int(...)``, dispatch/combine ``[b, n, e, c]``, experts by ``einsum`` on stacked weights."""

    own_capacity = True
    p_rule = "- (the layer enforces its own capacity)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=2, capacity_factor=1.0):
        super().__init__()
        self.E, self.k, self.cf = E, 2, capacity_factor
        self.w_gating = nn.Parameter(torch.randn(h, E) * h**-0.5)
        self.w1 = _stacked(E, h, f, h**-0.5)
        self.w2 = _stacked(E, f, h, f**-0.5)

    def forward(self, x):
        b, n, d = x.shape
        raw = torch.einsum("bnd,de->bne", x, self.w_gating).softmax(dim=-1)
        g1, i1 = raw.topk(1, dim=-1)
        g1, i1 = g1.squeeze(-1), i1.squeeze(-1)
        m1 = F.one_hot(i1, self.E).float()
        g2, i2 = (raw * (1.0 - m1)).topk(1, dim=-1)
        g2, i2 = g2.squeeze(-1), i2.squeeze(-1)
        m2 = F.one_hot(i2, self.E).float()
        denom = g1 + g2 + 1e-9
        g1, g2 = g1 / denom, g2 / denom
        cap = max(min(n, int(n * self.cf * self.k / self.E)), 4)
        pos1 = (torch.cumsum(m1, dim=-2) - 1.0) * m1
        m1 = m1 * (pos1 < cap).float()
        count1 = m1.sum(dim=-2, keepdim=True)
        pos1 = (pos1 * m1).sum(dim=-1)
        pos2 = (torch.cumsum(m2, dim=-2) - 1.0 + count1) * m2
        m2 = m2 * (pos2 < cap).float()
        pos2 = (pos2 * m2).sum(dim=-1)
        kept1, kept2 = m1.sum(-1), m2.sum(-1)
        oh1 = F.one_hot(pos1.long(), cap).float()
        oh2 = F.one_hot(pos2.long(), cap).float()
        combine = (g1 * kept1)[..., None, None] * m1[..., None] * oh1[..., None, :] + (g2 * kept2)[
            ..., None, None
        ] * m2[..., None] * oh2[..., None, :]  # [b, n, e, c]
        dispatch = (combine != 0).to(x.dtype)
        xe = torch.einsum("bnd,bnec->ebcd", x, dispatch)
        he = F.relu(torch.einsum("ebcd,edf->ebcf", xe, self.w1))
        ye = torch.einsum("ebcf,efd->ebcd", he, self.w2)
        return torch.einsum("ebcd,bnec->bnd", ye, combine.to(x.dtype))


class ExpertChoice(_Style):
    """Expert choice: every expert takes its top-``C`` tokens by score (a top-k over the
    token dimension of ``[E, T]``), gathers them, runs, and adds back weighted."""

    own_capacity = True
    p_rule = "- (expert choice: the layer enforces its own capacity)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, capacity_factor=2.0):
        super().__init__()
        self.E, self.cf = E, capacity_factor
        self.router = nn.Linear(h, E, bias=False)
        self.w_in = _stacked(E, h, f, h**-0.5)
        self.w_out = _stacked(E, f, h, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        C = min(T, int(T * self.cf / self.E))
        s = self.router(x).softmax(dim=-1)  # [T, E]
        g, tok = torch.topk(s.t(), C, dim=-1)  # [E, C]
        xe = x[tok]  # [E, C, H]
        ye = torch.bmm(F.gelu(torch.bmm(xe, self.w_in)), self.w_out) * g[..., None]
        out = torch.zeros_like(x).index_add(0, tok.reshape(-1), ye.reshape(-1, H))
        return out.reshape(B, S, H)


class Llama4Sigmoid(_Style):
    """Llama-4: top-1 over raw logits, scattered into a ``-inf`` row and passed through a
    sigmoid; the score scales each expert's *input*; every expert runs on every row
    (``[E, T, H]`` bmm, SwiGLU, no biases); a shared expert is added.

    Left as written, but not for a capacity of its own (it has none): the region the passes
    cut after its top-1 ends at the ``-inf`` row of selected logits, not at expert outputs, so
    no expert form reproduces it. ``explain`` says "enforces its own capacity" instead: the
    token-dependence check compares rows that hold ``-inf``, and ``-inf - -inf`` is NaN, which
    ``passes/verify.py``'s ``_error`` reads as a change."""

    p_rule = "softmax of the raw logits (top-k ran on logits)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=1):
        super().__init__()
        self.E, self.k = E, 1
        self.router = nn.Linear(h, E, bias=False)
        self.gate_up = _stacked(E, h, 2 * f, h**-0.5)
        self.down = _stacked(E, f, h, f**-0.5)
        self.shared = _Expert(h, f)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        logits = self.router(x)
        top_val, top_idx = torch.topk(logits, self.k, dim=1)
        if self.route_fn is None:
            scores = torch.full_like(logits, float("-inf")).scatter_(1, top_idx, top_val)
            scores = torch.sigmoid(scores.float()).to(x.dtype)
        else:  # the oracle: the same scores from (ids, W) after capacity
            ids, w = self._route(
                torch.softmax(logits.float(), -1), top_idx, torch.sigmoid(top_val.float())
            )
            scores = torch.zeros_like(logits).scatter(1, ids, w.to(x.dtype))
        routed_in = x.repeat(self.E, 1) * scores.t().reshape(-1, 1)
        h = torch.bmm(routed_in.view(self.E, T, H), self.gate_up)
        g, u = h.chunk(2, dim=-1)
        y = torch.bmm(u * F.silu(g), self.down).view(self.E, T, H)
        out = y.sum(dim=0) + self.shared(x)
        return out.reshape(B, S, H)


class SquaredReLU(_Style):
    """Squared-ReLU experts (Primer / Nemotron style), softmax top-k without renormalisation,
    a weight copy gathered per (token, slot) and ``bmm``."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.up = _stacked(E, h, f, h**-0.5)
        self.down = _stacked(E, f, h, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        p = torch.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        ids, w = self._route(p, ids, w)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(self.k, dim=0)
        h = torch.bmm(xr.unsqueeze(1), self.up[flat]).squeeze(1)
        h = torch.square(F.relu(h))
        y = torch.bmm(h.unsqueeze(1), self.down[flat]).squeeze(1)
        y = y * w.reshape(-1, 1)
        return y.view(T, self.k, H).sum(dim=1).reshape(B, S, H)


class GptOssClamped(_Style):
    """GPT-OSS: router with a bias, top-k over raw logits, softmax over the selected; experts
    with interleaved gate/up columns and biases, gate clamped above, up clamped both ways,
    ``gate * sigmoid(alpha * gate) * (up + 1)``; dispatch by a loop over experts hit."""

    p_rule = "softmax of the raw logits (top-k ran on logits)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K, limit=7.0, alpha=1.702):
        super().__init__()
        self.E, self.k, self.limit, self.alpha = E, k, limit, alpha
        self.router = nn.Linear(h, E, bias=True)
        self.gate_up = _stacked(E, h, 2 * f, 2.0 * h**-0.5)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * f) * 0.1)
        self.down = _stacked(E, f, h, f**-0.5)
        self.down_bias = nn.Parameter(torch.randn(E, h) * 0.1)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        logits = self.router(x)
        val, ids = torch.topk(logits, self.k, dim=-1)
        w = torch.softmax(val, dim=1, dtype=val.dtype)
        ids, w = self._route(torch.softmax(logits, -1), ids, w)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(self.k, dim=0)
        gu = torch.bmm(xr.unsqueeze(1), self.gate_up[flat]).squeeze(1) + self.gate_up_bias[flat]
        gate, up = gu[..., ::2], gu[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        h = (up + 1) * glu
        y = torch.bmm(h.unsqueeze(1), self.down[flat]).squeeze(1) + self.down_bias[flat]
        y = y * w.reshape(-1, 1)
        return y.view(T, self.k, H).sum(dim=1).reshape(B, S, H)


class SortSlice(_Style):
    """Selection by a descending ``sort`` over experts and a slice of the first ``k`` values
    and indices (issue 24's hand-written style), renormalised; stacked SwiGLU experts by a
    per-pair weight gather and ``einsum``."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.w1 = _stacked(E, h, f, h**-0.5)
        self.w3 = _stacked(E, h, f, h**-0.5)
        self.w2 = _stacked(E, f, h, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        p = self.gate(x).softmax(-1)
        vals, order = p.sort(dim=-1, descending=True)
        w, ids = vals[:, : self.k], order[:, : self.k]
        w = w / w.sum(-1, keepdim=True)
        ids, w = self._route(p, ids, w)
        g = torch.einsum("th,tkhf->tkf", x, self.w1[ids])
        u = torch.einsum("th,tkhf->tkf", x, self.w3[ids])
        y = torch.einsum("tkf,tkfh->tkh", F.silu(g) * u, self.w2[ids])
        return (y * w[..., None]).sum(1).reshape(B, S, H)


class ArgsortGather(_Style):
    """Selection by ``argsort(descending=True)[:, :k]``, weights gathered from the softmax at
    the selected experts (not renormalised); a loop over ``nn.ModuleList`` experts with
    boolean masks (static shapes)."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.experts = nn.ModuleList(_Expert(h, f) for _ in range(E))

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        p = torch.softmax(self.gate(x), dim=-1)
        ids = torch.argsort(p, dim=-1, descending=True)[:, : self.k]
        w = p.gather(1, ids)
        ids, w = self._route(p, ids, w)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            we = (w * (ids == e)).sum(-1, keepdim=True)  # 0 for tokens not routed to e
            out = out + we * expert(x)
        return out.reshape(B, S, H)


class RouterCapacity(_Style):
    """Capacity enforced in the router (issue 23): the gate weight of each pair past the
    layer's own capacity in its expert's queue (a cumsum over the flattened one-hot) is zeroed;
    the experts then run every pair."""

    own_capacity = True
    p_rule = "- (the layer enforces its own capacity)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K, capacity_factor=1.0):
        super().__init__()
        self.E, self.k, self.cf = E, k, capacity_factor
        self.router = nn.Linear(h, E, bias=False)
        self.w_in = _stacked(E, h, f, h**-0.5)
        self.w_out = _stacked(E, f, h, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        gate, idx = self.router(x).softmax(-1).topk(self.k, dim=-1)
        cap = math.ceil(self.cf * T * self.k / self.E)
        onehot = F.one_hot(idx, self.E).reshape(-1, self.E)
        place = (onehot.cumsum(0) * onehot).sum(-1).view(idx.shape)
        gate = gate * (place <= cap)
        h = F.gelu(torch.einsum("th,tkhf->tkf", x, self.w_in[idx]))
        y = torch.einsum("tkf,tkfh->tkh", h, self.w_out[idx])
        return torch.einsum("tk,tkh->th", gate, y).reshape(B, S, H)


class TemperatureTopK(_Style):
    """Temperature-scaled logits (``gate(x) / tau``), top-k, softmax *after* the top-k over
    the selected; stacked SwiGLU weights gathered per pair. P = softmax(gate(x) / tau) over all
    experts (SPEC.md, generic router)."""

    p_rule = "softmax(logits / tau) over experts"
    tau = 0.7

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.w1 = _stacked(E, f, h, h**-0.5)
        self.w3 = _stacked(E, f, h, h**-0.5)
        self.w2 = _stacked(E, h, f, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        logits = self.gate(x) / self.tau
        top, ids = logits.topk(self.k, dim=-1)
        w = top.softmax(dim=-1)
        ids, w = self._route(logits.softmax(-1), ids, w)
        a = torch.einsum("th,tkfh->tkf", x, self.w1[ids])
        b = torch.einsum("th,tkfh->tkf", x, self.w3[ids])
        y = torch.einsum("tkf,tkhf->tkh", F.silu(a) * b, self.w2[ids])
        return (w[..., None] * y).sum(1).reshape(B, S, H)


def _mlp_with_bias(h, f):
    return nn.Sequential(nn.Linear(h, f), nn.GELU(), nn.Linear(f, h))


class ArgmaxMaskAssign(_Style):
    """Top-1 by ``argmax`` of the softmax, weight = the max probability; each expert's rows
    written through a boolean mask (``out[mask] = expert(x[mask]) * w[mask]``) into a zero
    buffer; ``nn.ModuleList`` of Linear-GELU-Linear with biases."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS):
        super().__init__()
        self.E = E
        self.gate = nn.Linear(h, E, bias=False)
        self.experts = nn.ModuleList(_mlp_with_bias(h, f) for _ in range(E))

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        p = F.softmax(self.gate(x), dim=-1)
        ids = p.argmax(dim=-1, keepdim=True)
        w = p.gather(1, ids)
        ids, w = self._route(p, ids, w)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = ids[:, 0] == e
            out[mask] = expert(x[mask]) * w[mask]
        return out.reshape(B, S, H)


class WhereIndexAccumulate(_Style):
    """litgpt-style: softmax over the top-k logits, a one-hot mask per expert, ``torch.where``
    for the (token, slot) pairs, and ``y[tokens] += w * expert(x[tokens])`` (an indexed
    in-place add into a zero buffer). P = softmax(logits) over all experts."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.experts = nn.ModuleList(_Expert(h, f) for _ in range(E))

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        logits = self.gate(x)
        top, ids = torch.topk(logits, self.k)
        w = top.softmax(dim=-1)
        ids, w = self._route(logits.softmax(-1), ids, w)
        masks = F.one_hot(ids, num_classes=self.E).permute(2, 0, 1)  # [E, T, k]
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            t, j = torch.where(masks[e])
            y[t] += w[t, j, None] * expert(x[t])
        return y.reshape(B, S, H)


class ViewReadBeforeUpdate(_Style):
    """A view of the output buffer taken *before* the experts update it in place
    (``out.index_add_``), and that view returned: eager returns the updated values through
    the view. A rewrite that replaced only the buffer's later uses would return zeros; the
    passes must see the alias (matched correctly or left as written)."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.experts = nn.ModuleList(_Expert(h, f) for _ in range(E))

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        p = self.gate(x).softmax(-1)
        w, ids = p.topk(self.k, dim=-1)
        ids, w = self._route(p, ids, w)
        out = x.new_zeros(x.shape)
        seen = out.view(B, S, H)
        for e, expert in enumerate(self.experts):
            t, j = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, t, w[t, j, None] * expert(x[t]))
        return seen


class Llama4RouterTopK(_Style):
    """Llama-4's router with top-2 and the experts weighted on their *output*: top-k over raw
    logits, the top values scattered into a ``-inf`` row over all experts, a sigmoid (0 off
    the selection); each pair's weight gathered from that row; stacked SwiGLU weights gathered
    per pair. P = sigmoid(logits) over all experts (SPEC.md: top-k of raw logits, a sigmoid of
    the selected)."""

    p_rule = "sigmoid of the raw logits over experts"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.router = nn.Linear(h, E, bias=False)
        self.w1 = _stacked(E, f, h, h**-0.5)
        self.w3 = _stacked(E, f, h, h**-0.5)
        self.w2 = _stacked(E, h, f, f**-0.5)

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        logits = self.router(x)
        top, ids = torch.topk(logits, self.k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, ids, top)
        scores = torch.sigmoid(scores.float()).to(x.dtype)
        w = scores.gather(1, ids)
        ids, w = self._route(torch.sigmoid(logits.float()), ids, w)
        a = torch.einsum("th,tkfh->tkf", x, self.w1[ids])
        b = torch.einsum("th,tkfh->tkf", x, self.w3[ids])
        y = torch.einsum("tkf,tkhf->tkh", F.silu(a) * b, self.w2[ids])
        return (w[..., None] * y).sum(1).reshape(B, S, H)


class ExpertNormSquaredReLU(_Style):
    """Ergo's experts (transformers 5.25): squared-ReLU MLPs, each output normalised by an
    RMSNorm with the expert's own learned scale (an ``[E, H]`` tensor gathered per pair), in
    float32 and cast back, then weighted and summed over the k pairs. Softmax top-k,
    renormalised; one row per pair (``repeat_interleave``) through ``bmm``."""

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, k=TOP_K):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.up = _stacked(E, h, f, h**-0.5)
        self.down = _stacked(E, f, h, f**-0.5)
        self.norm = nn.Parameter(1.0 + 0.5 * torch.randn(E, h))

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        p = torch.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        ids, w = self._route(p, ids, w)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(self.k, dim=0)
        h = torch.square(F.relu(torch.bmm(xr.unsqueeze(1), self.up[flat]).squeeze(1)))
        y = torch.bmm(h.unsqueeze(1), self.down[flat]).squeeze(1)
        y = (F.rms_norm(y.float(), (H,), eps=1e-5) * self.norm[flat].float()).to(x.dtype)
        return (y.view(T, self.k, H) * w.unsqueeze(-1)).sum(dim=1).reshape(B, S, H)


class GShardTop2Dropless(GShardTop2):
    """DeepSpeed's top-2 with ``drop_tokens=False``: GShard's buffer positions (a cumsum over
    the one-hot, the second choices after all first ones) and ``[T, E, C]`` dispatch/combine
    tensors, but no capacity mask: the buffer holds ``C = T`` slots, more than any expert can
    get (a token picks an expert once), so nothing is dropped. The per-expert counts leave the
    layer (``self.exp_counts``, as DeepSpeed returns them). Dropless and token-wise: SPEC allows
    the rewrite; positions that move with the token order are no capacity of its own."""

    own_capacity = False
    p_rule = "softmax over experts"
    drop_tokens = False

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS):
        super().__init__(h, f, E)


class TokenTopKCapacity(_Style):
    """DeepSpeed's top-1 (``top1gating``): an ``argmax`` pick, then each expert keeps the
    first ``C`` of its tokens by a ``topk`` over the *token* axis of the one-hot mask
    (``topk(mask, k=C, dim=0)``) scattered back into a mask: its own capacity. The per-expert
    counts leave the layer (``self.exp_counts``), so its experts are never found and only the
    router's probe can say why it stays as written."""

    own_capacity = True
    p_rule = "- (the layer enforces its own capacity)"

    def __init__(self, h=HIDDEN, f=FFN, E=NUM_EXPERTS, capacity_factor=1.0):
        super().__init__()
        self.E, self.k, self.cf = E, 1, capacity_factor
        self.wg = nn.Linear(h, E, bias=False)
        self.w_in = _stacked(E, h, f, h**-0.5)
        self.w_out = _stacked(E, f, h, f**-0.5)
        self.exp_counts = None

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        T = x.shape[0]
        gates = F.softmax(self.wg(x), dim=1)
        cap = min(T, math.ceil(T / self.E * self.cf))
        mask = F.one_hot(torch.argmax(gates, dim=1), self.E)
        self.exp_counts = mask.sum(dim=0)
        keep = torch.topk(mask, k=cap, dim=0)[1]  # [C, E]: each expert's first C tokens
        mask = mask * torch.zeros_like(mask).scatter_(0, keep, 1)
        g = (gates * mask).sum(dim=1, keepdim=True)  # [T, 1]
        h = F.gelu(torch.einsum("th,tehf->tef", x, self.w_in[None].expand(T, -1, -1, -1)))
        y = torch.einsum("tef,efh->teh", h, self.w_out)
        return (g * (mask[:, :, None] * y).sum(dim=1)).reshape(B, S, H)


_STYLES: dict[str, type[_Style]] = {
    "sort_slice": SortSlice,
    "argsort_gather": ArgsortGather,
    "router_capacity": RouterCapacity,
    "modulelist_where": ModuleListWhere,
    "gshard_top2_own_capacity": GShardTop2,
    "bse_grouped_mm": BSEGroupedMM,
    "lucidrains_3d_gating": Lucidrains3D,
    "expert_choice": ExpertChoice,
    "llama4_sigmoid_top1": Llama4Sigmoid,
    "squared_relu": SquaredReLU,
    "gptoss_clamped_swiglu": GptOssClamped,
    "temperature_topk": TemperatureTopK,
    "argmax_mask_assign": ArgmaxMaskAssign,
    "where_index_accumulate": WhereIndexAccumulate,
    "view_read_before_update": ViewReadBeforeUpdate,
    "llama4_router_topk": Llama4RouterTopK,
    "expert_norm_relu2": ExpertNormSquaredReLU,
    "gshard_top2_dropless": GShardTop2Dropless,
    "token_topk_capacity": TokenTopKCapacity,
}
STYLES: tuple[str, ...] = tuple(_STYLES)


def build(style: str, seed: int = 0) -> _Style:
    """The style's module with random weights from ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = _STYLES[style]()
    return m.eval()


def hidden(module: nn.Module, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 11)
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    return x.to(getattr(module, "dtype", torch.float32))


@torch.no_grad()
def oracle(module: _Style, x: torch.Tensor, gamma, policy: str = "score", **opts):
    """The module's eager output with SPEC.md's capacity applied to its own selection, and
    the number of pairs dropped. ``gamma=None`` must give the module's own output."""
    import capmoe_compile
    from capmoe_compile import config

    dropped = 0

    def fn(probs, ids, w):
        nonlocal dropped
        E = probs.shape[-1]
        shape = ids.shape
        k = shape[-1]
        P = probs.reshape(-1, E).float()
        i2, w2 = capmoe_compile.route(
            P,
            ids.reshape(-1, k),
            w.reshape(-1, k).float(),
            capacity_factor=gamma,
            policy=policy,
            min_tokens=config.min_tokens,
            **opts,
        )
        drop = i2 >= E
        dropped += int(drop.sum())
        i2 = torch.where(drop, ids.reshape(-1, k).long(), i2.long())
        w2 = torch.where(drop, torch.zeros_like(w2), w2)
        return i2.reshape(shape).to(ids.dtype), w2.reshape(shape).to(w.dtype)

    module.route_fn = fn
    try:
        out = module(x)
    finally:
        module.route_fn = None
    return out, dropped


def compile_off_on(module: nn.Module, x: torch.Tensor, gamma=0.5, policy: str = "score"):
    """``(explain's report, output with capacity off, output with capacity gamma and policy)``
    of ``module`` compiled with ``backend="capmoe"`` on ``x`` (no grad; Dynamo reset before
    and after): the steps the tests of one layer share before they compare with eager and
    with :func:`oracle`."""
    import capmoe_compile

    torch._dynamo.reset()
    try:
        report = capmoe_compile.explain(module)(x)
        compiled = torch.compile(module, backend="capmoe")
        with torch.no_grad():
            off = compiled(x)
            with capmoe_compile.config.patch(capacity_factor=gamma, policy=policy):
                on = compiled(x)
    finally:
        torch._dynamo.reset()
    return report, off, on
