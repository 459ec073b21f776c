"""``@capmoe_compile.router``: a routing function no pattern knows, declared by the user."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from route_oracle import route_oracle

import capmoe_compile as cc

K = 2


def _sort_route(logits):
    # top-k spelled as an ascending sort of the negated scores: no pattern knows it (a
    # descending sort and a slice is a top-k site since issue 24: passes/routers._sort_site)
    p = logits.softmax(-1)
    s, i = torch.sort(-p, dim=-1)
    w = -s[:, :K]
    return w / w.sum(-1, keepdim=True), i[:, :K]


declared_route = cc.router(top_k=K)(_sort_route)


class SortRoutedMoE(nn.Module):
    def __init__(self, route, H=32, F_=48, E=4):
        super().__init__()
        self.route = route
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, H, F_) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E, F_, H) * 0.2)
        with torch.no_grad():  # a skewed router, so capacity has work to do
            self.gate.weight += torch.linspace(1.5, -1.5, E)[:, None]

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)
        w, ids = self.route(self.gate(x))
        out = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            e = ids[:, j]
            h = torch.bmm(x[:, None, :], self.w1[e])[:, 0]
            out = out + w[:, j : j + 1] * torch.bmm(F.gelu(h)[:, None, :], self.w2[e])[:, 0]
        return out.view(B, S, H)


def _oracle(m, x, gamma):
    xf = x.reshape(-1, x.shape[-1])
    logits = m.gate(xf)
    w, ids = _sort_route(logits)
    new_ids, new_w, _ = route_oracle(logits.softmax(-1), ids, w, capacity_factor=gamma)
    out = torch.zeros_like(xf)
    E = m.w1.shape[0]
    for t in range(xf.shape[0]):
        for e, wt in zip(new_ids[t], new_w[t], strict=True):
            if e != E:
                out[t] += wt * (F.gelu(xf[t] @ m.w1[e]) @ m.w2[e])
    return out.view_as(x)


def test_undeclared_unknown_router_is_not_found():
    torch.manual_seed(0)
    m = SortRoutedMoE(_sort_route).eval()
    report = cc.explain(m, capacity_factor=0.5)(torch.randn(2, 9, 32))
    assert report.layers == []


@pytest.mark.parametrize("gamma", [None, 0.5, 1.0])
def test_declared_router_is_rewritten(gamma):
    torch._dynamo.reset()
    torch.manual_seed(1)
    m = SortRoutedMoE(declared_route).eval()
    x = torch.randn(2, 9, 32)
    report = cc.explain(m, capacity_factor=gamma)(x)
    assert [r.router for r in report.layers] == ["declared"]
    f = torch.compile(m, backend="capmoe", options={"capacity_factor": gamma})
    with torch.no_grad(), cc.record_stats() as st:
        got = f(x)
        want = m(x) if gamma is None else _oracle(m, x, gamma)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if gamma is not None:
        assert int(st.layers[0].loads_after.max()) <= st.layers[0].capacity
        assert st.layers[0].dropped > 0 or gamma >= 1.0


def test_router_decorator_validates():
    with pytest.raises(ValueError, match="top_k"):
        cc.router(top_k=0)
    with pytest.raises(ValueError, match="score"):
        cc.router(top_k=1, score="tanh")
