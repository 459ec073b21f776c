"""A selection that also feeds values outside the experts (``passes/region.py``, side paths;
SPEC.md "Where capacity applies"): transformers' Inkling normalises its shared experts'
weights together with the selected routed experts' scores, so the top-k's indices reach the
layer's output through the shared experts as well as through the routed ones. Capacity
applies to the routed pairs; the side path keeps the router's own selection.

Checked on transformers' InklingMoE at a tiny size: matched, capacity off == eager, capacity
on == the oracle (``capmoe_compile.route`` on the routed pairs, the shared weights from the
router's own selection), through Inductor. A side path that reads an expert's weights is no
router output and is left as written. (``InklingShaped``, the same block spelled in plain
PyTorch with a slice of the joint weights as W, is itself still left as written: its W is
not told apart from the joint weights it is sliced from.)"""

from __future__ import annotations

import moe_styles
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import capmoe_compile


class InklingShaped(moe_styles._Style):
    """Sigmoid router over E routed + S shared logits with a selection bias; the k selected
    and the S shared logits normalised together (log-sigmoid, then a softmax over the k + S);
    routed experts by a loop over experts, shared experts weighted by their share."""

    def __init__(self, h=32, f=16, E=8, S=1, k=2):
        super().__init__()
        self.E, self.S, self.k = E, S, k
        self.gate = nn.Linear(h, E + S, bias=False)
        self.bias = nn.Buffer(0.1 * torch.randn(E))
        self.gate_up = nn.Parameter(torch.randn(E, 2 * f, h) * h**-0.5)
        self.down = nn.Parameter(torch.randn(E, h, f) * f**-0.5)
        self.shared_up = nn.Parameter(torch.randn(S, f, h) * h**-0.5)
        self.shared_down = nn.Parameter(torch.randn(S, h, f) * f**-0.5)

    def router(self, flat):
        logits = self.gate(flat)
        routed = logits[:, : self.E]
        ids = torch.topk(routed.sigmoid() + self.bias, self.k, dim=-1).indices
        joint = torch.cat([routed.gather(-1, ids), logits[:, self.E :]], dim=-1)
        logp = F.logsigmoid(joint)
        w_all = torch.exp(logp - torch.logsumexp(logp, dim=-1, keepdim=True))
        return (
            routed.sigmoid(),
            ids,
            w_all[:, : self.k].contiguous(),
            w_all[:, self.k :].contiguous(),
        )

    def shared(self, flat, gammas):
        h = torch.einsum("th,sfh->stf", flat, self.shared_up)
        y = torch.einsum("stf,shf->sth", F.silu(h) * gammas.t()[:, :, None], self.shared_down)
        return y.sum(0)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        p, ids, w, gammas = self.router(flat)
        ids, w = self._route(p, ids, w)
        out = torch.zeros_like(flat)
        for e in range(self.E):
            tok, pos = torch.where(ids == e)
            g, u = F.linear(flat[tok], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, self.down[e]) * w[tok, pos, None])
        return (out + self.side(self.shared(flat, gammas), ids)).reshape(B, S, H)

    def side(self, shared, ids):
        return shared


class SideReadsExpertWeights(InklingShaped):
    """The selection also feeds a value computed from a routed expert's weights: a second
    use of the experts, not a router output."""

    def side(self, shared, ids):
        return shared * self.down[ids[:, 0]].sum((-1, -2))[:, None]  # [T, 1], an expert weight


def _build(cls, seed):
    torch.manual_seed(seed)
    return cls().eval()


def _inkling_moe(seed, impl="grouped_mm", E=8, S=2, k=2, H=32, F_=16):
    """transformers' InklingMoE block at a tiny size, random weights."""
    from transformers import InklingTextConfig
    from transformers.models.inkling import modeling_inkling as M

    cfg = InklingTextConfig(
        hidden_size=H, moe_intermediate_size=F_, n_routed_experts=E, n_shared_experts=S,
        num_experts_per_tok=k, route_scale=2.0,
    )  # fmt: skip
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    m = M.InklingMoE(cfg).eval()
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)
    nn.init.normal_(m.gate.e_score_correction_bias, std=0.1)
    return m


@torch.no_grad()
def _inkling_oracle(m, x, gamma, policy):
    """The block with SPEC's capacity on its routed pairs (route() on the router's own P, S,
    W), the shared experts' weights as the router made them."""
    E = m.gate.num_experts
    flat = x.reshape(-1, x.shape[-1])
    P = torch.nn.functional.linear(flat.float(), m.gate.weight.float()).sigmoid()[:, :E]
    dropped = 0

    def pre(module, args):
        nonlocal dropped
        h, ids, w = args
        ids2, w2 = capmoe_compile.route(P, ids, w.float(), capacity_factor=gamma, policy=policy)
        drop = ids2 >= E
        dropped += int(drop.sum())
        ids2 = torch.where(drop, ids, ids2.to(ids.dtype))
        return h, ids2, torch.where(drop, 0.0, w2).to(w.dtype)

    handle = m.experts.register_forward_pre_hook(pre)
    try:
        return m(x), dropped
    finally:
        handle.remove()


@pytest.mark.parametrize(("seed", "impl"), [(0, "grouped_mm"), (1, "grouped_mm"), (0, "eager")])
def test_inkling_matched_off_is_eager_on_is_the_oracle(seed, impl):
    """Under ``eager`` the experts loop is bridged, and the unread halves of its
    ``torch.where`` (with the asserts on their sizes) go with the region."""
    m = _inkling_moe(seed, impl)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(seed))
    rep, off, got = moe_styles.compile_off_on(m, x)
    with torch.no_grad():
        torch.testing.assert_close(off, m(x), rtol=1e-4, atol=1e-5)
    assert [r.matched for r in rep.layers] == [True], rep
    want, dropped = _inkling_oracle(m, x, 0.5, "score")
    assert dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_side_path_through_expert_weights_is_left_as_written():
    m = _build(SideReadsExpertWeights, 0)
    x = moe_styles.hidden(m)
    rep, _, got = moe_styles.compile_off_on(m, x)
    assert not rep.layers, rep
    with torch.no_grad():
        torch.testing.assert_close(got, m(x), rtol=1e-4, atol=1e-5)
