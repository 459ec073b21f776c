"""Packed expert weights (``capmoe_compile.lowering.cpu_packed``) and their frozen-weights
contract (``capmoe_compile.freeze_experts``).

The packed kernels against a float64 ``x @ w.T`` on shapes that hit every row block (1-6
rows, balanced blocks above), every column-block width (16-64 and a tail), reductions across
the kernels' 512-step chunks, strided rows and an output window whose neighbours must stay
untouched; a row's result independent of the other rows of the call; ``capmoe::experts_cpu``
with frozen weights against SPEC's reference, the packed kernel's calls counted (the test
fails if the op stops using it). The contract: an in-place update, a ``.data`` swap and a
``load_state_dict`` after the weights were packed are all seen (the next call equals the
reference with the new weights), on the op and through ``torch.compile(backend="capmoe")``;
weights created under ``inference_mode`` are refused; ``thaw_experts`` and a freed weight drop
the packed copy. Skipped only where the kernel cannot run (no AVX-512, or no AVX-512 bf16, or
no C++ compiler).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from expert_cases import FORMS, NAN, make_params, one_thread_poison
from expert_cases import gen as _gen

import capmoe_compile
from capmoe_compile.experts import moe_experts_reference
from capmoe_compile.lowering import cpu_experts, cpu_gemm, cpu_packed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 0.0, torch.bfloat16: 2**-8}


def _kernel(dtype):
    fn = cpu_packed.kernel(dtype)
    if fn is None:
        isa = "AVX-512" if dtype == torch.float32 else "AVX-512 bf16"
        pytest.skip(f"packed {dtype} kernel needs an x86-64 CPU with {isa} and a C++ compiler")
    return fn


@pytest.fixture(autouse=True, scope="module")
def _one_thread_poison():
    """One intra-op thread (the op uses the kernels only then); uninitialised memory is NaN."""
    with one_thread_poison():
        yield


def _mm(fn, x, packed_e, N, out):
    fn(x.data_ptr(), x.stride(0), packed_e, 0, out.data_ptr(), out.stride(0), len(x), N, x.shape[1])
    return out


@pytest.mark.parametrize("dt", list(DTYPES))
def test_kernel_shapes_strides_tails(dt):
    dtype = DTYPES[dt]
    fn = _kernel(dtype)
    g = torch.Generator().manual_seed(0)
    Ks = (1, 7, 300, 1030) if dtype == torch.float32 else (2, 8, 300, 1100)
    for K in Ks:
        for N in (16, 48, 64, 80, 176):
            E = 2
            w = torch.randn(E, N, K + 4, generator=g).to(dtype)[:, :, 1 : 1 + K]
            packed = cpu_packed.pack(w)
            assert packed.shape == (E, N * K)
            for M in (1, 2, 5, 6, 7, 13, 40):
                x = torch.randn(M, K + 5, generator=g).to(dtype)[:, 2 : 2 + K]
                for e in range(E):
                    buf = torch.full((M, N + 6), NAN, dtype=dtype)
                    out = buf[:, 3 : 3 + N]
                    ptr = packed.data_ptr() + e * packed.stride(0) * packed.element_size()
                    _mm(fn, x, ptr, N, out)
                    ref = x.double() @ w[e].double().t()
                    # bf16: the output's rounding; both: fp32 sums, bounded by sum |x w|
                    tol = TOL[dtype] * ref.abs() + 1e-5 * (
                        x.double().abs() @ w[e].double().abs().t()
                    )
                    assert ((out.double() - ref).abs() <= tol).all(), (dt, M, N, K, e)
                    assert buf[:, :3].isnan().all() and buf[:, 3 + N :].isnan().all()


@pytest.mark.parametrize("dt", list(DTYPES))
def test_kernel_rows_independent_of_batch(dt):
    """A row's result is bit-for-bit the same whatever other rows share the call."""
    dtype = DTYPES[dt]
    fn = _kernel(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1100, generator=g).to(dtype)
    w = torch.randn(1, 80, 1100, generator=g).to(dtype)
    packed = cpu_packed.pack(w)
    full = _mm(fn, x, packed.data_ptr(), 80, torch.empty(40, 80, dtype=dtype))
    for lo, hi in ((0, 1), (5, 7), (11, 40), (3, 9)):
        part = _mm(fn, x[lo:hi], packed.data_ptr(), 80, torch.empty(hi - lo, 80, dtype=dtype))
        assert torch.equal(part, full[lo:hi])


def test_packable():
    assert cpu_packed.packable(torch.empty(2, 32, 8))
    assert not cpu_packed.packable(torch.empty(2, 24, 8))  # out not a multiple of 16
    assert not cpu_packed.packable(torch.empty(2, 32, 7, dtype=torch.bfloat16))  # odd in
    assert not cpu_packed.packable(torch.empty(32, 8))
    assert not cpu_packed.packable(torch.empty(2, 32, 8, dtype=torch.float64))


def _case(form_name, dtype, sizes, H, F, key):
    form = FORMS[form_name]
    gen = _gen("cpu_packed", form_name, str(dtype), *key)
    E = len(sizes)
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(sizes)] + [torch.full((9,), E)])
    ids = flat[torch.randperm(flat.numel(), generator=gen)].reshape(-1, 1)
    params = make_params(form, E, H, F, dtype, gen)
    x = torch.randn(ids.shape[0], H, generator=gen).to(dtype).masked_fill(ids == E, NAN)
    w = (torch.rand(ids.shape, generator=gen) + 0.05).to(dtype).masked_fill(ids == E, NAN)
    return form, ids, params, x, w


def _counted(monkeypatch, dtype):
    fn = _kernel(dtype)
    calls = []  # rows of every product the packed kernel computes (its 7th argument)
    monkeypatch.setitem(cpu_packed._fns, dtype, lambda *a: calls.append(a[6]) or fn(*a))
    return calls


def _check(got, ref, dtype):
    assert got.dtype == dtype and not got.isnan().any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("form_name", list(FORMS))
def test_experts_cpu_packed(form_name, dt, monkeypatch):
    """The op with frozen weights against SPEC's reference, groups around the packed kernel's
    row limit; every projection of a group within it goes through the packed kernel."""
    dtype = DTYPES[dt]
    calls = _counted(monkeypatch, dtype)
    monkeypatch.setitem(cpu_packed.MAX_ROWS, dtype, 40)
    sizes = (1, 2, 5, 0, 6, 7, 17, 40, 41, 300)
    form, ids, params, x, w = _case(form_name, dtype, sizes, 512, cpu_gemm.MIN_IN + 16, ())
    frozen = [p for p in params if p.dim() == 3 and cpu_packed.freeze(p)]
    try:
        got = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
        ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
        _check(got, ref, dtype)
        if form.transposed:  # [in, out] storage: the op's few-row path is not taken
            assert calls == []
        else:
            # every projection frozen: groups above the row limit are cut into chunks within
            # it, so every kept row goes through the packed kernel, at most 40 rows a call
            assert len(frozen) == sum(1 for r in form.roles if not r.startswith("b_"))
            assert calls and max(calls) <= 40
            assert sum(calls) == sum(sizes) * len(frozen)
    finally:
        for p in frozen:
            cpu_packed.thaw(p)


def test_experts_cpu_partly_packed(monkeypatch):
    """gate_up's 2F = 520 outputs are not a multiple of 16: only the down projection is packed,
    groups above the row limit are not cut (torch.mm takes them whole), and the result is
    still SPEC's."""
    calls = _counted(monkeypatch, torch.float32)
    monkeypatch.setitem(cpu_packed.MAX_ROWS, torch.float32, 40)
    sizes = (1, 2, 5, 0, 6, 7, 17, 40, 41, 300)
    form, ids, params, x, w = _case("swiglu_fused", torch.float32, sizes, 512, 260, ("part",))
    frozen = [p for p in params if cpu_packed.freeze(p)]
    try:
        assert len(frozen) == 1 and frozen[0] is params[1]
        got = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
        ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
        _check(got, ref, torch.float32)
        assert sorted(calls) == sorted(n for n in sizes if 0 < n <= 40)
    finally:
        for p in frozen:
            cpu_packed.thaw(p)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_updates_are_seen(dt, monkeypatch):
    """After the weights were packed: an in-place write, a ``.data`` swap and a write through a
    view each change the next call's result to the reference of the new weights."""
    dtype = DTYPES[dt]
    calls = _counted(monkeypatch, dtype)
    sizes = (3, 9, 0, 14)
    form, ids, params, x, w = _case("swiglu_fused", dtype, sizes, 512, 272, ("update",))
    assert all(cpu_packed.freeze(p) for p in params)
    gen = torch.Generator().manual_seed(7)
    updates = [
        lambda: params[0].mul_(-0.5),
        lambda: params[1].copy_(torch.randn(params[1].shape, generator=gen).to(dtype) * 0.05),
        lambda: setattr(params[0], "data", params[0].data.flip(1).contiguous()),
        lambda: params[1][3].zero_(),  # one expert, through a view of the stacked weight
    ]
    try:
        before = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
        for update in updates:
            n = len(calls)
            with torch.no_grad():
                update()
            got = cpu_experts.experts_cpu(x, ids, w, params, form.to_str())
            ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
            _check(got, ref, dtype)
            assert not torch.equal(got, before)
            assert len(calls) > n  # still through the packed kernel, repacked
            before = got
    finally:
        for p in params:
            cpu_packed.thaw(p)


def test_inference_tensors_refused():
    with torch.inference_mode():
        m = torch.nn.Module()
        m.w = torch.nn.Parameter(torch.randn(4, 32, 16), requires_grad=False)
    with pytest.raises(ValueError, match="inference_mode"):
        capmoe_compile.freeze_experts(m)
    assert cpu_packed.packed(m.w) is None


def test_no_kernel_warns_and_freezes_nothing(monkeypatch):
    """Where the CPU has no packed kernel (here: claimed so), freezing says so and takes
    nothing, instead of returning a count that does not hold."""
    monkeypatch.setitem(cpu_packed._fns, torch.float32, None)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(2, 32, 16))
    with pytest.warns(UserWarning, match="no packed kernel for float32"):
        assert capmoe_compile.freeze_experts(m) == 0
    assert cpu_packed.packed(m.a) is None


def test_thaw_and_freed_weights_drop_the_copy():
    _kernel(torch.float32)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(2, 32, 16))
    m.b = torch.nn.Parameter(torch.randn(2, 24, 16))  # out not a multiple of 16: not taken
    m.c = torch.nn.Parameter(torch.randn(32, 16))  # not stacked experts
    base = cpu_packed.frozen_count()
    assert capmoe_compile.freeze_experts(m) == 1
    assert cpu_packed.frozen_count() == base + 1
    assert cpu_packed.packed(m.a) is not None and cpu_packed.packed(m.b) is None
    assert capmoe_compile.thaw_experts(m) == 1
    assert cpu_packed.packed(m.a) is None and cpu_packed.frozen_count() == base
    capmoe_compile.freeze_experts(m)
    del m
    gc.collect()
    assert cpu_packed.frozen_count() == base


def test_compiled_layer_sees_load_state_dict(monkeypatch):
    """A transformers Mixtral block compiled with ``backend="capmoe"``, frozen after compiling:
    the packed kernel runs, and a ``load_state_dict`` of other weights afterwards gives eager's
    output with those weights."""
    from capmoe_compile.lowering import grouped
    from capmoe_compile.testing import zoo

    calls = _counted(monkeypatch, torch.float32)
    monkeypatch.setattr(grouped, "CPU_OP_MIN_WEIGHTS", 0)

    model = zoo.build("mixtral", num_layers=1, hidden=256, ffn=256, num_experts=8, top_k=2)
    layer = zoo.moe_layers(model)[0].block
    other = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.std())

    def first(y):
        return y[0] if isinstance(y, tuple) else y

    x = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        cap = torch.compile(layer, backend="capmoe", dynamic=False)
        with torch.no_grad():
            unpacked = first(cap(x))
            assert capmoe_compile.freeze_experts(layer) == 2
            got = first(cap(x))
            assert calls, "the packed kernel did not run"
            torch.testing.assert_close(got, first(layer(x)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got, unpacked, rtol=1e-4, atol=1e-5)
            layer.load_state_dict(other.state_dict())
            got = first(cap(x))
            torch.testing.assert_close(got, first(other(x)), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(got, unpacked)
    finally:
        capmoe_compile.thaw_experts(layer)
        torch._dynamo.reset()
