"""The passes leave what they do not rewrite exactly as written."""

from __future__ import annotations

import pytest
import torch

import capmoe_compile as cc
from capmoe_compile.passes import routers
from capmoe_compile.testing import zoo


def test_unmatched_layers_compute_as_written(monkeypatch):
    """With no router pattern, nothing is rewritten, and the graph must still compute eager's
    result: DeepSeek-V3's group-limited router builds its mask with a user-less in-place
    ``group_mask.scatter_(...)``, which a global dead-code pass would delete."""
    monkeypatch.setattr(routers, "ROUTER_PATTERNS", [])
    torch._dynamo.reset()
    model = zoo.build("deepseek_v3", seed=5)
    ids = zoo.random_input_ids(model, 2, 16, seed=5)
    report = cc.explain(model, capacity_factor=0.5)(ids)
    assert report.layers == [] and len(report.unmatched) >= 2
    compiled = torch.compile(model, backend="capmoe", options={"capacity_factor": 0.5})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_eager_experts_implementation_is_matched():
    """transformers' `eager` experts loop (over the experts hit, from nonzero) is bridged into
    one graph under capmoe (capmoe_compile/bridge.py): both layers are matched, and with
    capacity off the compiled model computes eager's result."""
    torch._dynamo.reset()
    model = zoo.build("mixtral", experts_implementation="eager", num_experts=4, seed=6)
    ids = zoo.random_input_ids(model, 2, 16, seed=6)
    from benchmarks.coverage import PassesBackend

    be = PassesBackend()  # the passes' rewrite run as FX (Inductor on it: tests/test_bridge.py)
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert be.graphs == 1
    assert [r.matched for r in be.reports] == [True, True], [r.reason for r in be.reports]
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "hidden, ffn, dtype, lowering",
    [
        (64, 128, torch.float32, "traced grouped_mm"),  # small layer: the traced path
        # 3 * E * H * F = 6.3M expert weights >= CPU_OP_MIN_WEIGHTS (4.2M); a narrow H keeps the
        # rest of the model (attention, embeddings) and the verification trials cheap
        (128, 2048, torch.float32, "capmoe::experts_cpu"),
        # every kernel before the reference says why not (lowering/kernels.py)
        (64, 128, torch.float16, "reference (not capmoe::experts_cpu: float16 (fp32 and bf16"),
    ],
)
def test_explain_says_what_runs_the_experts(hidden, ffn, dtype, lowering):
    model = zoo.build("mixtral", hidden=hidden, ffn=ffn, seed=0).to(dtype)
    report = cc.explain(model, capacity_factor=1.0)(zoo.random_input_ids(model, 2, 8))
    assert len(report.layers) == 2
    assert all(r.lowering.startswith(lowering) for r in report.layers), report
    assert f"experts run by {lowering}" in str(report)
