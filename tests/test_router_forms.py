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


class ScoresBiasRouter(SoftmaxBiasRouter):
    """top-k over (scores + a correction bias); the weights read the scores at the selected
    experts. ``score`` None: raw logits, sigmoid of the selected (Kolibri-1; P = softmax of
    the logits, SPEC's rule for a top-k on raw logits); else that score function first
    (DeepSeek-V4's sqrt-softplus; P = its output)."""

    def __init__(self, score=None):
        super().__init__()
        self.score = score

    def route(self, x):
        logits = self.gate(x)
        scores = logits if self.score is None else self.score(logits)
        _, ids = torch.topk(scores + self.bias, K, dim=-1)
        w = scores.gather(1, ids)
        if self.score is None:
            w = w.sigmoid()
            P = torch.softmax(logits, dim=-1)
        else:
            P = scores
        return P, ids, w / w.sum(-1, keepdim=True)


def _sqrt_softplus(v):
    return torch.sqrt(F.softplus(v))


class SequentialPicksRouter(SoftmaxBiasRouter):
    """Top-2 as two top-1 picks over raw logits, each weighted by a softmax over the logits
    within a relative margin of its pick (PhiMoE's sparsemixer at inference; this project's
    code). S is the top-2 of the logits: P = softmax of them (SPEC's generic rule)."""

    eps = 0.3

    def _pick(self, scores, logits):
        top, idx = scores.max(dim=-1, keepdim=True)
        far = (top - logits) / logits.abs().clamp(min=top) > 2 * self.eps
        w = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, idx)
        return w, idx

    def route(self, x):
        logits = self.gate(x)
        w1, i1 = self._pick(logits, logits)
        w2, i2 = self._pick(torch.scatter(logits, -1, i1, float("-inf")), logits)
        return torch.softmax(logits, dim=-1), torch.cat((i1, i2), dim=-1), torch.cat((w1, w2), -1)


def test_sequential_top1_picks_matched_as_top2():
    _check_router(SequentialPicksRouter, "sequential_top1_logits")


class _SecondPickKeepsFirst(SequentialPicksRouter):
    """The second max does not exclude the first pick (scattered to 0, not -inf): not a
    top-2, left as written."""

    def route(self, x):
        logits = self.gate(x)
        w1, i1 = self._pick(logits, logits)
        w2, i2 = self._pick(torch.scatter(logits, -1, i1, 0.0), logits)
        return torch.softmax(logits, dim=-1), torch.cat((i1, i2), dim=-1), torch.cat((w1, w2), -1)


def test_sequential_picks_without_exclusion_left():
    torch.manual_seed(0)
    reports = _passes_reports(_SecondPickKeepsFirst().eval(), torch.randn(2, 8, H))
    assert reports and not any(r.matched for r in reports), reports


def test_softmax_bias_router_matched_p_is_the_softmax():
    _check_router(SoftmaxBiasRouter, "softmax_bias_topk")


def test_logits_bias_router_p_is_softmax_of_logits():
    _check_router(ScoresBiasRouter, "logits_bias_topk")


def test_score_fn_bias_router_p_is_the_score():
    _check_router(lambda: ScoresBiasRouter(_sqrt_softplus), "scores_bias_topk")


def _check_router(make, kind):
    from benchmarks.coverage import PassesBackend

    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(2, 16, H)
    x[:, :, :4] += 2.0  # skew: some experts overflow at gamma 0.5
    be = PassesBackend()  # the passes' rewrite, run as FX (Inductor's lowering: elsewhere)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(m, backend=be)
        torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
        assert [r.router for r in be.reports if r.matched] == [kind], be.reports
        with capmoe_compile.config.patch(capacity_factor=0.5, policy="score"):
            got = compiled(x)
        xf = x.reshape(-1, H)
        P, ids, w = m.route(xf)
        ids2, w2 = capmoe_compile.route(P, ids, w, capacity_factor=0.5)
        assert (ids2 == E).any()
        want = m.experts(xf, ids2, w2).view_as(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- expert forms: clamped / interleaved GPT-OSS gating, squared ReLU -------------------------


def _passes_reports(module, x):
    from benchmarks.coverage import PassesBackend

    be = PassesBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=be)(x)
        want = module(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return be.reports


def test_clamped_gating_form_keeps_the_clamp():
    """At small activations the clamp of GPT-OSS gating never binds, so an unclamped form
    reproduces the real selection too; the verifier's large-activation trial rejects it and
    the form holds the region's own limit."""
    import moe_styles

    m = moe_styles.build("gptoss_clamped_swiglu")
    (rep,) = _passes_reports(m, moe_styles.hidden(m))
    assert rep.matched, rep.reason
    assert "interleaved" in rep.experts and f"limit {m.limit:g}" in rep.experts, rep.experts
    assert f"alpha {m.alpha:g}" in rep.experts and "up+1" in rep.experts, rep.experts


def test_squared_relu_form():
    import moe_styles

    m = moe_styles.build("squared_relu")
    (rep,) = _passes_reports(m, moe_styles.hidden(m))
    assert rep.matched and rep.experts == "mlp(relu2)", (rep.experts, rep.reason)


def test_interleaved_split_dims_agree():
    """The CPU op runs the MLP on transposed rows (``split_dim=0``): interleaved gate/up must
    pick the same columns there as on rows (``split_dim=-1``)."""
    from capmoe_compile.experts import ExpertForm

    form = ExpertForm(("gate_up", "down"), "silu", (), True, True, True, 7.0, 1.702, 1.0)
    torch.manual_seed(0)
    x, wgu, wd = torch.randn(5, H), torch.randn(2 * FF, H), torch.randn(H, FF)
    w = {"gate_up": wgu, "down": wd}

    def rows(role, h):
        return h @ w[role].t()

    def cols(role, h):  # h is [in, n]: W @ h
        return w[role] @ h

    a = form.mlp(x, rows)
    b = form.mlp(x.t(), cols, split_dim=0).t()
    torch.testing.assert_close(a, b)
    g, u = (x @ wgu.t())[:, ::2], (x @ wgu.t())[:, 1::2]
    g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
    torch.testing.assert_close(a, ((u + 1) * (g * torch.sigmoid(g * 1.702))) @ wd.t())


def test_softcapped_swiglu_form():
    """Inkling-2's gating: cap(g, 4) * sigmoid(g) * cap(up, 25), cap(v, c) = tanh(v / c) * c."""
    from capmoe_compile.experts import ExpertForm

    form = ExpertForm(("gate_up", "down"), "silu", (), True, True, softcap=(4.0, 25.0))
    assert ExpertForm.from_str(form.to_str()) == form and form.activation is None
    torch.manual_seed(0)
    x, wgu, wd = torch.randn(5, H) * 8, torch.randn(2 * FF, H), torch.randn(H, FF)
    w = {"gate_up": wgu, "down": wd}
    got = form.mlp(x, lambda role, h: h @ w[role].t())
    g, u = (x @ wgu.t()).chunk(2, -1)
    want = (torch.tanh(g / 4) * 4 * torch.sigmoid(g) * (torch.tanh(u / 25) * 25)) @ wd.t()
    torch.testing.assert_close(got, want)
