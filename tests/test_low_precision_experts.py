"""Experts that compute in bf16 inside a float32 layer (issue 24, third-party coverage:
torchtitan's ``GroupedExperts``), and the dispatch around them written as torchtitan writes
it: a ``[B, L, E]`` router, ``zeros_like(scores, dtype=bool).scatter_(-1, ids, True)`` for the
per-expert counts (the scores read for their shape alone), the selection read both as
``ids_BLK`` and as ``ids_BLK.view(T, K)``, tokens sorted by expert, three
``torch._grouped_mm`` on ``.bfloat16()`` operands, ``.type_as(x)``, the score applied in
float32 after the experts, and a ``scatter_add`` combine.

Plain PyTorch, this project's own code after torchtitan 0.3.0's published layer (no
torchtitan import). Checked as ``tests/test_families.py`` checks its styles: matched,
capacity off == eager, capacity on == the oracle built on ``capmoe_compile.route`` from the
module's own (P, S, W); and the ``low_precision`` form family's body against an independent
computation of one expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import capmoe_compile
from benchmarks import coverage as cv
from capmoe_compile import config, forms
from capmoe_compile.experts import ExpertForm, moe_experts_reference

H, FF, E, K = 32, 64, 8, 2


class TitanStyle(nn.Module):
    """``score_func`` softmax (no bias) or sigmoid with route_norm and an expert bias that
    only selects (the weights come from the scores before the bias)."""

    def __init__(self, score_func: str = "softmax", bias: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.score_func, self.route_norm = score_func, score_func == "sigmoid"
        self.gate = nn.Linear(H, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(0.2 * torch.randn(E, H, generator=g))
        self.w1 = nn.Parameter(0.2 * torch.randn(E, FF, H, generator=g))
        self.w2 = nn.Parameter(0.2 * torch.randn(E, H, FF, generator=g))
        self.w3 = nn.Parameter(0.2 * torch.randn(E, FF, H, generator=g))
        self.register_buffer("expert_bias", 0.05 * torch.randn(E, generator=g) if bias else None)
        self.route_fn = None

    def router(self, x):
        scores = self.gate(x)
        scores = torch.sigmoid(scores) if self.score_func == "sigmoid" else F.softmax(scores, -1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        _, ids = torch.topk(choice, k=K, dim=-1, sorted=False)
        w = scores.gather(dim=-1, index=ids)
        if self.route_norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_fn is not None:  # the oracle: SPEC's assignment on (P, S, W)
            ids, w = self.route_fn(scores, ids, w)
        return w, ids, scores

    def experts(self, x, counts):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(x.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(x.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)

    def forward(self, x_BLD):
        w_BLK, ids_BLK, scores = self.router(x_BLD)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ids_BLK, True)
        counts = routing_map.sum(dim=(0, 1))
        B, L, D = x_BLD.shape
        T = B * L
        x_TD = x_BLD.view(T, D)
        order = torch.argsort(ids_BLK.view(T, K).view(-1), stable=True)
        w_sorted = w_BLK.view(T, K).view(-1)[order]
        tok = order // K
        routed = self.experts(x_TD[tok], counts)
        routed = (routed.to(torch.float32) * w_sorted.reshape(-1, 1)).to(routed.dtype)
        out = torch.zeros_like(x_TD).scatter_add(0, tok.reshape(-1, 1).expand(-1, D), routed)
        return out.view(B, -1, D)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 24, H, generator=torch.Generator().manual_seed(seed + 11))


@torch.no_grad()
def _oracle(module: TitanStyle, x: torch.Tensor, gamma):
    """The module with SPEC's capacity applied to its own (P = the score function's output,
    before the bias; S; W): a dropped pair keeps its expert with weight 0."""
    dropped = 0

    def fn(P, ids, w):
        nonlocal dropped
        i2, w2 = capmoe_compile.route(
            P.reshape(-1, E).float(),
            ids.reshape(-1, K),
            w.reshape(-1, K).float(),
            capacity_factor=gamma,
            policy="score",
            min_tokens=config.min_tokens,
        )
        drop = i2 >= E
        dropped += int(drop.sum())
        i2 = torch.where(drop, ids.reshape(-1, K), i2.to(ids.dtype))
        w2 = torch.where(drop, torch.zeros_like(w2), w2)
        return i2.reshape(ids.shape), w2.reshape(w.shape).to(w.dtype)

    module.route_fn = fn
    try:
        return module(x), dropped
    finally:
        module.route_fn = None


@pytest.fixture(autouse=True)
def _clean_config():
    before = config.snapshot()
    yield
    for name, value in before.items():
        setattr(config, name, value)


@pytest.mark.parametrize(("score_func", "bias"), [("softmax", False), ("sigmoid", True)])
def test_torchtitan_style_is_matched_off_equals_eager_on_equals_oracle(score_func, bias):
    module = TitanStyle(score_func, bias).eval()
    x = _x()
    with torch.no_grad():
        eager = module(x)
    base, none = _oracle(module, x, None)
    assert none == 0 and torch.equal(base, eager)  # the oracle is the module when off

    def make(names, gamma):
        def run():
            out, dropped = _oracle(module, x, gamma)
            return out, {"dropped": dropped, "unhooked": []}

        return run

    torch._dynamo.reset()
    rec = cv.check_model(module, {"x_BLD": x}, oracle=make, use_explain=False, count_eager=False)
    torch._dynamo.reset()
    assert rec["passes_matched"], rec.get("passes_left")
    (layer,) = rec["explain"]["matched"]
    assert "computed in bfloat16" in layer["experts"], layer
    assert rec["off"]["ok"], rec["off"]
    # the experts' bf16 rounding is kept: capacity off is eager to float32 rounding
    assert rec["off"]["max_diff"] < 1e-5, rec["off"]
    on = rec["on"]
    assert on["ok"] and on["dropped"] > 0, on


class TitanMixedRounding(TitanStyle):
    """bf16 projections, but the gated product in float32, rounded to bf16 once: not the
    bf16 MLP (it rounds ``silu(g)`` and the product separately), nor the float32 one."""

    def experts(self, x, counts):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        g = torch._grouped_mm(x.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(x.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        h = (F.silu(g.float()) * u.float()).bfloat16()
        return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)


def test_experts_rounding_otherwise_are_left_as_written():
    """No form rounds as these experts do: the layer is left, with the no-form reason, and
    capacity on gives eager."""
    module = TitanMixedRounding().eval()
    x = _x()
    with torch.no_grad():
        eager = module(x)
    torch._dynamo.reset()
    rep = capmoe_compile.explain(module)(x)
    torch._dynamo.reset()
    assert not rep.layers, str(rep)
    assert any("no known expert form" in u.reason for u in rep.unmatched), str(rep)
    with config.patch(capacity_factor=0.5, policy="score"), torch.no_grad():
        got = torch.compile(module, backend="capmoe")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_float32_experts_get_no_low_precision_candidates():
    """A region that casts to no low float dtype is offered no bf16 form: a float32 expert
    is never replaced by a bf16 one (nor the reverse, the bf16 one not being float32)."""
    (fam,) = [f for f in forms.families() if f.name == "low_precision"]
    g = torch.fx.Graph()
    x = g.placeholder("x")
    assert fam.constants([g.call_method("float", (x,)), g.call_function(torch.mul, (x, 2.0))]) == []
    assert fam.constants([g.call_method("bfloat16", (x,))]) == ["bfloat16"]
    assert fam.constants([g.call_method("to", (x, torch.float16))]) == ["float16"]


def test_low_precision_reference_is_the_eager_expert():
    torch.manual_seed(0)
    w1, w2, w3 = torch.randn(3, FF, H), torch.randn(3, H, FF), torch.randn(3, FF, H)
    form = ExpertForm(
        ("gate", "down", "up"), "silu", family="low_precision", extra=(("compute", "bfloat16"),)
    )
    assert not form.projections_only  # only the reference kernel runs it
    assert ExpertForm.from_str(form.to_str()) == form
    x = torch.randn(5, H)
    ids = torch.tensor([[0], [2], [1], [2], [3]])  # 3: the sentinel, skipped
    w = torch.rand(5, 1)
    got = moe_experts_reference(x, ids, w, [w1, w2, w3], form)
    want = torch.zeros(5, H)
    for t in range(5):
        e = int(ids[t, 0])
        if e == 3:
            continue
        xb = x[t : t + 1].bfloat16()
        h = F.silu(xb @ w1[e].bfloat16().t()) * (xb @ w3[e].bfloat16().t())
        want[t] = w[t, 0] * (h @ w2[e].bfloat16().t()).float()[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and it is not the float32 expert: the rounding is the form's
    fp32 = moe_experts_reference(x, ids, w, [w1, w2, w3], ExpertForm(form.roles, "silu"))
    assert (fp32 - got).abs().max() > 1e-3
