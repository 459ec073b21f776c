"""The expert_norm form family (``capmoe_compile/forms/expert_norm.py``, Ergo's experts: an
MLP, then an RMSNorm of each expert's output with the expert's own scale). The style
``expert_norm_relu2`` (``tests/moe_styles.py``) is checked end to end by
``tests/test_families.py``: matched, capacity off == eager, capacity on == the oracle built on
``capmoe_compile.route``. Here: the family's body against an independent computation, and the
layer's explain line."""

from __future__ import annotations

import moe_styles
import torch

import capmoe_compile
from capmoe_compile.experts import ExpertForm, moe_experts_reference


def test_expert_norm_reference_is_the_eager_expert():
    torch.manual_seed(0)
    E, H, F, T = 3, 8, 6, 5
    up, down = torch.randn(E, H, F), torch.randn(E, F, H)
    norm = torch.randn(E, H)
    form = ExpertForm(
        ("up", "down", "norm"),
        "relu2",
        ("up", "down"),
        family="expert_norm",
        extra=(("eps", 1e-5),),
    )
    assert not form.projections_only  # only the reference kernel runs it
    x = torch.randn(T, H)
    ids = torch.tensor([[0], [2], [1], [2], [3]])  # 3: the sentinel, skipped
    w = torch.rand(T, 1)
    got = moe_experts_reference(x, ids, w, [up, down, norm], form)
    want = torch.zeros(T, H)
    for t in range(T):
        e = int(ids[t, 0])
        if e == E:
            continue
        y = torch.relu(x[t] @ up[e]) ** 2 @ down[e]
        y = y / torch.sqrt((y * y).mean() + 1e-5) * norm[e]
        want[t] = w[t, 0] * y
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_style_is_matched_with_its_eps_and_run_by_the_reference():
    m = moe_styles.build("expert_norm_relu2")
    torch._dynamo.reset()
    rep = capmoe_compile.explain(m)(moe_styles.hidden(m))
    torch._dynamo.reset()
    (layer,) = rep.layers
    assert layer.form.family == "expert_norm" and layer.form.option("eps") == 1e-5, layer
    assert sorted(layer.form.roles) == ["down", "norm", "up"]
