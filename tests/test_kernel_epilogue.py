"""The traced epilogue kernel (``capmoe_compile/lowering/epilogue.py``): experts whose form
adds a row-wise step after the projections (``expert_norm``: Ergo's per-expert RMSNorm) run
as traced aten ops for Inductor instead of the reference's loop over experts. Checked against
the reference kernel (``experts.moe_experts_reference``, the SPEC's eager loop) on fresh
random inputs of several shapes, dtypes and sentinel (dropped) pairs, and end to end on the
``expert_norm_relu2`` style: which kernel runs, capacity off == eager, capacity on == the
oracle built on ``capmoe_compile.route``."""

from __future__ import annotations

import moe_styles
import pytest
import torch

from capmoe_compile.experts import ExpertForm, moe_experts_reference
from capmoe_compile.lowering import epilogue, grouped, kernels


def _form(transposed=("up", "down"), eps=1e-5, act="relu2"):
    return ExpertForm(
        ("up", "down", "norm"), act, transposed, family="expert_norm", extra=(("eps", eps),)
    )


def _params(E, H, F, transposed, dtype, gen):
    up = torch.randn(E, H, F, generator=gen) if "up" in transposed else torch.randn(E, F, H)
    down = torch.randn(E, F, H, generator=gen) if "down" in transposed else torch.randn(E, H, F)
    norm = torch.rand(E, H, generator=gen) + 0.5
    return [(up * H**-0.5).to(dtype), (down * F**-0.5).to(dtype), norm.to(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("E", "H", "F", "T", "k", "transposed"),
    [(4, 16, 32, 9, 2, ("up", "down")), (8, 32, 16, 33, 3, ()), (3, 8, 8, 1, 1, ("down",))],
)
def test_kernel_equals_the_reference(dtype, E, H, F, T, k, transposed):
    gen = torch.Generator().manual_seed(E * 100 + T)
    form = _form(transposed)
    params = _params(E, H, F, transposed, dtype, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E + 1, generator=gen)[:k] for _ in range(T)])  # E: dropped
    w = torch.rand(T, k, generator=gen).to(dtype)
    q = kernels.KernelQuery.of(x, params, form)
    kernel, _ = kernels.choose(q)
    assert kernel.name == epilogue.NAME
    got = kernel.run(x, ids, w, params, form, None)
    want = moe_experts_reference(x, ids, w, params, form)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_declines_what_it_cannot_run():
    x = torch.randn(4, 8)
    params = _params(3, 8, 8, ("up", "down"), torch.float32, torch.Generator().manual_seed(0))
    plain = ExpertForm(("up", "down"), "relu", ("up", "down"))
    ok, why = epilogue.supports(kernels.KernelQuery.of(x, params[:2], plain))
    assert not ok and "projections alone" in why
    ok, why = epilogue.supports(kernels.KernelQuery.of(x.half(), params, _form()))
    assert not ok and "float16" in why
    mixed = [params[0], params[1], params[2].double()]
    ok, why = epilogue.supports(kernels.KernelQuery.of(x, mixed, _form()))
    assert not ok and "another dtype" in why


def test_the_style_runs_on_it_and_equals_eager_and_the_oracle():
    m = moe_styles.build("expert_norm_relu2")
    x = moe_styles.hidden(m)
    rep, off, got = moe_styles.compile_off_on(m, x)
    (layer,) = rep.layers
    assert layer.lowering.startswith(epilogue.NAME), layer.lowering
    with torch.no_grad():
        torch.testing.assert_close(off, m(x), rtol=1e-4, atol=1e-5)
    want, dropped = moe_styles.oracle(m, x, 0.5, "score")
    assert dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert grouped.REFERENCE not in layer.lowering.split(" (")[0]
