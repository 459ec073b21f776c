"""The shared_norm form family (``capmoe_compile/forms/shared_norm.py``: an MLP, then an
RMSNorm with one ``[H]`` scale every expert reads; transformers' MuseSpark) and the dense
prefix cut of the region (``passes/region.py``: the experts read the token input through a
projection and a norm of their own, outside the router's path).

Checked: the family's body against an independent computation for each variant; a
MuseSpark-shaped layer (projection and norm before the experts, router on the block's input,
a shared input-scaled norm after each expert, projection after) is matched with that form,
run by the traced epilogue kernel, capacity off == eager and capacity on == the oracle built
on ``capmoe_compile.route``, compiled through Inductor; a shared vector that is not a shared
scale is left as written."""

from __future__ import annotations

import moe_styles
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import capmoe_compile
from capmoe_compile.experts import ExpertForm, moe_experts_reference
from capmoe_compile.lowering import epilogue


def _form(before, offset, eps=1e-6):
    return ExpertForm(
        ("gate_up", "down", "shared_norm"),
        "silu",
        (),
        family="shared_norm",
        extra=(("before", before), ("eps", eps), ("offset", offset)),
    )


@pytest.mark.parametrize(
    ("before", "offset"), [(True, 1.0), (True, 0.0), (False, 1.0), (False, 0.0)]
)
def test_reference_is_the_eager_expert(before, offset):
    gen = torch.Generator().manual_seed(3)
    E, H, F_, T = 3, 8, 6, 7
    gate_up, down = torch.randn(E, 2 * F_, H, generator=gen), torch.randn(E, H, F_, generator=gen)
    s = torch.randn(H, generator=gen)
    x = torch.randn(T, H, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [2, 1], [0, 2], [1, 3]])  # 3: dropped
    w = torch.rand(T, 2, generator=gen)
    got = moe_experts_reference(x, ids, w, [gate_up, down, s], _form(before, offset))
    want = torch.zeros(T, H)
    scale = s + offset
    for t in range(T):
        for j in range(2):
            e = int(ids[t, j])
            if e == E:
                continue
            g, u = (gate_up[e] @ x[t]).chunk(2)
            y = down[e] @ (F.silu(g) * u)
            if before:
                y = y * scale
                y = y / torch.sqrt((y * y).mean() + 1e-6)
            else:
                y = y / torch.sqrt((y * y).mean() + 1e-6) * scale
            want[t] += w[t, j] * y
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _InputScaledNorm(nn.Module):
    """MuseSpark's post-expert norm: ``rms_norm(y * (1 + w))``, written out."""

    def __init__(self, h, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.3 * torch.randn(h))

    def forward(self, y):
        out = y.float() * (1.0 + self.weight).float()
        out = out.type_as(y).float()
        return (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(y)


class MuseSparkShaped(moe_styles._Style):
    """The block as transformers' MuseSpark writes it, with a softmax top-k router: the
    router reads the block's input; the experts read ``norm(proj(x))`` of another width,
    loop over hit experts, normalise each output with one shared scale, and a projection maps
    the sum back."""

    def __init__(self, h=32, m=24, f=16, E=8, k=2):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(h, E, bias=False)
        self.pre = nn.Linear(h, m, bias=False)
        self.pre_norm = nn.RMSNorm(m, eps=1e-5)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * f, m) * m**-0.5)
        self.down = nn.Parameter(torch.randn(E, m, f) * f**-0.5)
        self.post_norm = _InputScaledNorm(m)
        self.post = nn.Linear(m, h, bias=False)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        p = torch.softmax(self.gate(flat), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids, w = self._route(p, ids, w)
        h = self.pre_norm(self.pre(flat))
        out = torch.zeros_like(h)
        for e in range(self.E):
            tok, pos = torch.where(ids == e)
            g, u = F.linear(h[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = self.post_norm(F.linear(F.silu(g) * u, self.down[e]))
            out.index_add_(0, tok, y * w[tok, pos, None])
        return self.post(out).reshape(B, S, H)


def _build(cls=MuseSparkShaped, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def test_the_layer_is_matched_past_its_dense_prefix_and_runs_on_the_epilogue_kernel():
    m = _build()
    x = moe_styles.hidden(m)
    torch._dynamo.reset()
    rep = capmoe_compile.explain(m)(x)
    torch._dynamo.reset()
    (layer,) = rep.layers
    assert layer.form.family == "shared_norm", layer
    assert layer.form.option("before") and layer.form.option("offset") == 1.0
    assert layer.form.option("eps") == 1e-8
    assert layer.lowering.startswith(epilogue.NAME), layer.lowering


@pytest.mark.parametrize("seed", [0, 1])
def test_capacity_off_is_eager_and_on_is_the_oracle(seed):
    m = _build(seed=seed)
    x = moe_styles.hidden(m, seed=seed)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="capmoe")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
        with capmoe_compile.config.patch(capacity_factor=0.5, policy="score"):
            got = compiled(x)
    torch._dynamo.reset()
    want, dropped = moe_styles.oracle(m, x, 0.5, "score")
    assert dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _SharedBias(MuseSparkShaped):
    """A vector every expert adds after its own norm-free MLP: no shared_norm form
    reproduces it (it is a bias, not a norm scale), so the layer must stay as written."""

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        p = torch.softmax(self.gate(flat), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        ids, w = self._route(p, ids, w)
        h = self.pre_norm(self.pre(flat))
        out = torch.zeros_like(h)
        for e in range(self.E):
            tok, pos = torch.where(ids == e)
            g, u = F.linear(h[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = torch.tanh(F.linear(F.silu(g) * u, self.down[e]) + self.post_norm.weight)
            out.index_add_(0, tok, y * w[tok, pos, None])
        return self.post(out).reshape(B, S, H)


def test_a_shared_vector_no_form_reproduces_is_left_as_written():
    m = _build(_SharedBias)
    x = moe_styles.hidden(m)
    rep, _, got = moe_styles.compile_off_on(m, x)
    assert not rep.layers, rep
    with torch.no_grad():
        torch.testing.assert_close(got, m(x), rtol=1e-4, atol=1e-5)
