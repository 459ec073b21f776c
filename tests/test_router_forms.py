"""Router spellings added for issue 14: each matched, with P by SPEC.md, and capacity on equal to
``capmoe_compile.route`` applied to the layer's own selection (the eager oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import capmoe_compile

H, FF, E, K = 16, 32, 8, 2


class SoftmaxBiasRouter(nn.Module):
    """Ernie-4.5 style: a correction bias added to the softmax output selects the experts;
    the weights are gathered from the softmax output and renormalised (this project's code)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, E), requires_grad=False)
        self.w1 = nn.Parameter(torch.randn(E, FF, H) * H**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, FF) * FF**-0.5)

    def route(self, x):
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        _, ids = torch.topk(probs + self.bias, K, dim=-1)
        w = torch.gather(probs, -1, ids)
        return probs, ids, w / w.sum(-1, keepdim=True)

    def experts(self, x, ids, w):
        out = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            keep = ids[:, j] < E
            e = ids[keep, j]
            h = F.gelu(torch.einsum("nh,nfh->nf", x[keep], self.w1[e]))
            y = torch.einsum("nf,nhf->nh", h, self.w2[e])
            out[keep] += w[keep, j, None] * y
        return out

    def forward(self, x):
        B, S, _ = x.shape
        x = x.reshape(-1, H)
        _, ids, w = self.route(x)
        xs = x.repeat_interleave(K, 0)
        e = ids.reshape(-1)
        h = F.gelu(torch.einsum("nh,nfh->nf", xs, self.w1[e]))
        y = torch.einsum("nf,nhf->nh", h, self.w2[e]).view(-1, K, H)
        return (y * w[..., None]).sum(1).view(B, S, H)


def test_softmax_bias_router_matched_p_is_the_softmax():
    torch.manual_seed(0)
    m = SoftmaxBiasRouter().eval()
    x = torch.randn(2, 16, H)
    x[:, :, :4] += 2.0  # skew: some experts overflow at gamma 0.5
    with torch.no_grad():
        rep = capmoe_compile.explain(m, capacity_factor=0.5)(x)
        assert [r.router for r in rep.layers] == ["softmax_bias_topk"], str(rep)
        got = torch.compile(m, backend="capmoe", options={"capacity_factor": 0.5})(x)
        xf = x.reshape(-1, H)
        P, ids, w = m.route(xf)
        ids2, w2 = capmoe_compile.route(P, ids, w, capacity_factor=0.5)
        assert (ids2 == E).any()
        want = m.experts(xf, ids2, w2).view_as(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
