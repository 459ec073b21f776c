"""The experts-kernel registry (issue 24): a kernel is one ``lowering.kernels.Kernel``; the
highest-priority one that supports a layer runs it, and ``explain`` says why each kernel
before it was not chosen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import capmoe_compile as cc
from capmoe_compile import experts
from capmoe_compile.lowering import epilogue, grouped, kernels
from capmoe_compile.testing import zoo


@pytest.fixture
def counting_kernel():
    calls = []

    def supports(q: kernels.KernelQuery):
        if q.dtype != torch.float32:
            return False, "fp32 only"
        return True, ""

    def run(x, ids, weights, params, form, tile):
        calls.append(tuple(x.shape))
        f = experts.ExpertForm.from_str(form) if isinstance(form, str) else form
        return experts.moe_experts_reference(x, ids, weights, params, f).to(x.dtype)

    k = kernels.register_kernel(kernels.Kernel("test kernel", 100, supports, run))
    yield k, calls
    kernels._KERNELS.remove(k)


def test_a_registered_kernel_runs_the_layers_it_supports(counting_kernel):
    _, calls = counting_kernel
    torch._dynamo.reset()
    model = zoo.build("mixtral", hidden=64, ffn=128, seed=0)
    ids = zoo.random_input_ids(model, 2, 8)
    with torch.no_grad():
        want = model(ids).logits
        report = cc.explain(model, capacity_factor=None)(ids)
        got = torch.compile(model, backend="capmoe")(ids).logits
    torch._dynamo.reset()
    assert all(r.lowering == "test kernel" for r in report.layers), report
    assert calls, "the registered kernel never ran"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_explain_says_why_each_kernel_was_passed_over(counting_kernel):
    q = kernels.KernelQuery(torch.device("cpu"), torch.float16, _form(), 10, True)
    kernel, passed = kernels.choose(q)
    assert kernel.name == grouped.REFERENCE
    names = [n for n, _ in passed]
    assert names == [
        "test kernel",
        grouped.CPU_OP,
        grouped.TRITON_OP,
        grouped.TRACED,
        epilogue.NAME,
    ]
    assert dict(passed)["test kernel"] == "fp32 only"
    assert dict(passed)[grouped.TRITON_OP] == "not on CUDA"
    assert "float16" in kernels.describe_choice(q)


def test_cpu_op_by_weight_size():
    small = kernels.KernelQuery(torch.device("cpu"), torch.float32, _form(), 1 << 20, True)
    big = kernels.KernelQuery(torch.device("cpu"), torch.float32, _form(), 1 << 23, True)
    assert kernels.choose(small)[0].name == grouped.TRACED
    assert kernels.choose(big)[0].name == grouped.CPU_OP


def test_no_if_chain_over_kernel_names():
    """Kernels are chosen by their ``supports``, never by comparing their names."""
    names = {k.name for k in kernels.kernels()}
    for path in Path(kernels.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                hit = [
                    c.value
                    for c in ast.walk(node)
                    if isinstance(c, ast.Constant) and c.value in names
                ]
                assert not hit, f"{path.name}:{node.lineno} compares against {hit}"


def _form() -> experts.ExpertForm:
    return experts.ExpertForm(("gate_up", "down"), "silu", (), True, True)
