"""The CPU experts op's few-row fp32 GEMM kernel (``capmoe_compile.lowering.cpu_gemm``).

Against a float64 ``x @ w.T`` on shapes that hit every block and tail of the kernel (rows not
a multiple of 3, weight rows not a multiple of 4, reductions not a multiple of 8, strided
rows, an output that is a column window of a wider buffer whose other columns must stay
untouched), row-by-row independence of the batch, and ``capmoe::experts_cpu`` with the kernel
on and off against the reference on groups around ``cpu_gemm.max_rows`` (the kernel's calls
counted, so the test fails if the op stops using it). Skipped only where the kernel is not
available (not x86-64 with AVX2, or no C++ compiler).
"""

from __future__ import annotations

import pytest
import torch
from expert_cases import FORMS, NAN, make_params, one_thread_poison
from expert_cases import gen as _gen

from capmoe_compile.experts import moe_experts_reference
from capmoe_compile.lowering import cpu_experts, cpu_gemm


@pytest.fixture(scope="module")
def FN():
    """The compiled kernel (compiled here, not at collection: a few seconds on a cold cache)."""
    fn = cpu_gemm.kernel()
    if fn is None:
        pytest.skip("few-row kernel unavailable on this machine (not x86-64 AVX2, no compiler)")
    return fn


@pytest.fixture(autouse=True, scope="module")
def _one_thread_poison():
    """One intra-op thread (the op uses the kernels only then); uninitialised memory is NaN."""
    with one_thread_poison():
        yield


def test_kernel_shapes_strides_tails(FN):
    g = torch.Generator().manual_seed(0)
    for M in (1, 2, 3, 4, 7, 128):
        for N in (1, 3, 4, 5, 9, 64):
            for K in (0, 1, 7, 8, 9, 17, 256, 300):
                x = torch.randn(M, K + 5, generator=g)[:, 2 : 2 + K]
                w = torch.randn(N, K + 3, generator=g)[:, :K]
                buf = torch.full((M, N + 6), NAN)
                out = buf[:, 3 : 3 + N]
                assert cpu_gemm.fits(x, w, out)
                cpu_gemm.mm_nt(x, w, out, FN)
                ref = (x.double() @ w.double().t()).float()
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1, K) ** 0.5)
                assert buf[:, :3].isnan().all() and buf[:, 3 + N :].isnan().all()


def test_kernel_rows_independent_of_batch(FN):
    """A row's result is bit-for-bit the same whatever other rows share the call."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 264, generator=g)
    w = torch.randn(37, 264, generator=g)
    full = cpu_gemm.mm_nt(x, w, torch.empty(40, 37), FN)
    for lo, hi in ((0, 1), (5, 7), (11, 40), (3, 6)):
        part = cpu_gemm.mm_nt(x[lo:hi], w, torch.empty(hi - lo, 37), FN)
        assert torch.equal(part, full[lo:hi])


def test_max_rows():
    assert cpu_gemm.max_rows(1024, 512) == cpu_gemm.MAX_ROWS_SHORT_IN
    assert cpu_gemm.max_rows(512, 1024) == cpu_gemm.MAX_ROWS
    assert cpu_gemm.max_rows(1024, 1024) == cpu_gemm.max_rows(1024, 2048) == cpu_gemm.MAX_ROWS_MID
    assert cpu_gemm.max_rows(4096, 1024) == cpu_gemm.MAX_ROWS_BIG


def test_disabled(FN):
    with cpu_gemm.disabled():
        assert cpu_gemm.kernel() is None
    assert cpu_gemm.kernel() is FN


def test_fits_refuses():
    x, w, out = torch.randn(4, 8), torch.randn(5, 8), torch.empty(4, 5)
    assert cpu_gemm.fits(x, w, out)
    assert not cpu_gemm.fits(x.double(), w.double(), out.double())
    assert not cpu_gemm.fits(x.t().contiguous().t(), w, out)  # column-major rows
    assert not cpu_gemm.fits(x, w.t().contiguous().t(), out)
    assert not cpu_gemm.fits(x, w, torch.empty(5, 4).t())
    assert not cpu_gemm.fits(x, w[:, :7], out)


# Groups around the op's switches (kernel up to max_rows rows, torch.mm above), an empty expert.
SIZES = (1, 2, 5, 0, 16, 17, 32, 33, 300)


@pytest.mark.parametrize("form_name", list(FORMS))
@pytest.mark.parametrize(
    "kernel, F",
    [(True, cpu_gemm.MIN_IN + 8), (True, 24), (False, cpu_gemm.MIN_IN + 8)],
    ids=["kernel", "kernel_small_F", "mm"],
)
def test_experts_cpu_with_kernel(form_name, kernel, F, monkeypatch, FN):
    """The op with the kernel (both projections; or gate/up only, the down projection's
    in = F below MIN_IN) and without, against the reference; routing weights are folded into
    the down projection's input where there is no down bias."""
    form = FORMS[form_name]
    H, E = 1024, len(SIZES)  # gate/up: 32 rows (in = 1024, < 1 Mi elements); down: 16
    gen = _gen("cpu_gemm", form_name, F)
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(SIZES)] + [torch.full((9,), E)])
    ids = flat[torch.randperm(flat.numel(), generator=gen)].reshape(-1, 1)
    params = make_params(form, E, H, F, torch.float32, gen)
    x = torch.randn(ids.shape[0], H, generator=gen).masked_fill(ids == E, NAN)
    w = (torch.rand(ids.shape, generator=gen) + 0.05).masked_fill(ids == E, NAN)
    calls = []  # rows of every product the kernel computes (its 7th argument)
    monkeypatch.setitem(
        cpu_gemm._state, "fn", (lambda *a: calls.append(a[6]) or FN(*a)) if kernel else None
    )
    got = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
    ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
    assert not got.isnan().any()
    assert (got[(ids == E).all(-1)] == 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if kernel and not form.transposed:
        expect = []  # every product of a group with few enough rows for its weight
        for r, p in zip(form.roles, params, strict=True):
            if not r.startswith("b_") and p.shape[2] >= cpu_gemm.MIN_IN:
                expect += [n for n in SIZES if 0 < n <= cpu_gemm.max_rows(*p.shape[1:])]
        assert expect and sorted(calls) == sorted(expect)
    else:  # off, or weights stored [in, out] (the kernel reads [out, in])
        assert calls == []


def test_profiler_phases_do_not_change_results(FN):
    """Under torch.profiler the op opens ``capmoe::dispatch / experts / combine`` ranges
    (``benchmarks/moe_layer.py``'s in-situ breakdown) and returns the same bits as without;
    the breakdown's parts are each counted once and the rest is ``other``."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import moe_layer

    form = FORMS["swiglu_fused"]
    gen = _gen("cpu_gemm_phases", "swiglu_fused", 300)
    E, H, T, k = 6, 1024, 40, 2
    params = make_params(form, E, H, 300, torch.float32, gen)
    ids = torch.randint(0, E + 1, (T, k), generator=gen)  # some sentinel (dropped) pairs
    x, w = torch.randn(T, H, generator=gen), torch.rand(T, k, generator=gen)

    def op(x):
        return cpu_experts.experts_cpu(x, ids, w, params, form.to_str())

    plain = op(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = op(x)
    assert torch.equal(plain, profiled)
    names = {e.key for e in prof.key_averages()}
    assert {"capmoe::dispatch", "capmoe::experts", "capmoe::combine"} <= names
    split = moe_layer.breakdown(op, x, n=2)
    assert split["route"] == 0 and split["experts"] > 0 and split["dispatch"] > 0
    phases = sum(split[p] for p in moe_layer.PHASES)
    assert split["other"] == pytest.approx(max(0.0, split["total"] - phases))
    assert 0 < split["overhead_share"] < 1
    assert moe_layer.breakdown(lambda x: x @ x.t(), x, n=1) is None  # no experts op ran


# ---------------------------------------------------------------------------------------------
# the bf16 kernel (AVX-512 bf16): fp32 sums, one rounding per output (issue 26)
# ---------------------------------------------------------------------------------------------

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def FN16():
    fn = cpu_gemm.kernel_bf16()
    if fn is None:
        pytest.skip("bf16 few-row kernel unavailable (no AVX-512 bf16, or no compiler)")
    return fn


def test_bf16_kernel_shapes_strides_tails(FN16):
    """Against fp64 sums of the bf16 values, rounded once to bf16: equal but for the fp32
    accumulation order (within one bf16 ulp of the exact sum)."""
    g = torch.Generator().manual_seed(26)
    for M in (1, 2, 3, 4, 5, 7):
        for N in (1, 3, 4, 5, 9, 64):
            for K in (0, 1, 31, 32, 33, 64, 300, 1024):
                x = torch.randn(M, K + 5, generator=g).to(BF16)[:, 2 : 2 + K]
                w = torch.randn(N, K + 3, generator=g).to(BF16)[:, :K]
                buf = torch.full((M, N + 6), NAN, dtype=BF16)
                out = buf[:, 3 : 3 + N]
                assert cpu_gemm.fits(x, w, out)
                cpu_gemm.mm_nt(x, w, out, FN16)
                exact = x.double() @ w.double().t()
                # one bf16 ulp of the exact result (2^-7 relative), and fp32 noise near 0
                tol = exact.abs() * 2.0**-7 + 1e-5 * max(1, K) ** 0.5
                assert ((out.double() - exact).abs() <= tol).all(), (M, N, K)
                assert buf[:, :3].isnan().all() and buf[:, 3 + N :].isnan().all()


def test_bf16_kernel_rows_independent_of_batch(FN16):
    g = torch.Generator().manual_seed(27)
    x = torch.randn(11, 1000, generator=g).to(BF16)
    w = torch.randn(37, 1000, generator=g).to(BF16)
    full = cpu_gemm.mm_nt(x, w, torch.empty(11, 37, dtype=BF16), FN16)
    for lo, hi in ((0, 1), (5, 7), (2, 11)):
        part = cpu_gemm.mm_nt(x[lo:hi], w, torch.empty(hi - lo, 37, dtype=BF16), FN16)
        assert torch.equal(part, full[lo:hi])


def test_bf16_disabled(FN16):
    with cpu_gemm.disabled():
        assert cpu_gemm.kernel_bf16() is None
    assert cpu_gemm.kernel_bf16() is FN16


@pytest.mark.parametrize("combine", ["float32", "dtype"])
@pytest.mark.parametrize("form_name", list(FORMS))
def test_experts_cpu_bf16_kernel(form_name, combine, monkeypatch, FN16):
    """The bf16 op with the kernel against SPEC's eager reference (bf16 tolerance), groups of
    1..300 rows (the kernel for <= MAX_ROWS_BF16, transposed or torch.mm above); the kernel's
    calls counted, so the test fails if the op stops using it."""
    import dataclasses

    form = dataclasses.replace(FORMS[form_name], combine=combine)
    sizes = (1, 2, 3, 4, 0, 5, 6, 7, 33, 300)
    H, F, E = 512, cpu_gemm.MIN_IN + 32, len(sizes)
    gen = _gen("cpu_gemm_bf16", form_name, combine)
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(sizes)] + [torch.full((9,), E)])
    ids = flat[torch.randperm(flat.numel(), generator=gen)].reshape(-1, 1)
    params = make_params(form, E, H, F, BF16, gen)
    x = torch.randn(ids.shape[0], H, generator=gen).to(BF16).masked_fill(ids == E, NAN)
    w = (torch.rand(ids.shape, generator=gen) + 0.05).to(BF16).masked_fill(ids == E, NAN)
    calls = []
    monkeypatch.setitem(cpu_gemm._state, "bf16", lambda *a: calls.append(a[6]) or FN16(*a))
    got = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
    ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
    assert got.dtype == BF16 and not got.isnan().any()
    assert (got[(ids == E).all(-1)] == 0).all()
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    if not form.transposed:
        n_proj = sum(1 for r in form.roles if not r.startswith("b_"))
        expect = [n for n in sizes if 0 < n <= cpu_gemm.MAX_ROWS_BF16] * n_proj
        assert sorted(calls) == sorted(expect)
    else:
        assert calls == []
