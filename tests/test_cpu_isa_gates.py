"""What the CPU kernels decide from the ISA probes, with the probes monkeypatched (issue 26).

On an AVX-512 + AMX Xeon a bf16 layer benchmark raised "expected one MoE layer call in the
stats, got 0" (the layer left as written); it does not on this AVX-512 machine without AMX.
Nothing in capmoe reads AMX: these tests claim AMX (and other ISAs) through the probes the
code and the benchmarks read, and check that the kernels' gates and a bf16 layer's rewrite do
not change with it. The numerics of oneDNN's AMX kernels themselves cannot run here.
"""

from __future__ import annotations

import pytest
import torch

from capmoe_compile.lowering import cpu_gemm


@pytest.fixture
def fresh_kernels(monkeypatch):
    """``cpu_gemm``'s compiled-kernel cache emptied for the test (restored after)."""
    monkeypatch.setattr(cpu_gemm, "_state", {})


def _claim(monkeypatch, capability="AVX512", amx=True, bf16=None):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    if bf16 is not None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)


@pytest.mark.parametrize(
    "capability, hint", [("AVX512", cpu_gemm.PREFETCH_HINT), ("AVX2", "T0"), ("DEFAULT", "T0")]
)
def test_prefetch_hint_by_capability(monkeypatch, capability, hint):
    _claim(monkeypatch, capability)
    assert cpu_gemm._hint() == hint


def test_kernels_do_not_depend_on_amx(monkeypatch, fresh_kernels):
    """AMX claimed or not, the fp32 kernel follows the ATen capability and the bf16 kernel
    AVX-512 bf16 alone (an AMX CPU has both)."""
    if cpu_gemm.kernel() is None or cpu_gemm.kernel_bf16() is None:
        pytest.skip("no AVX-512 bf16 here: the bf16 kernel cannot be compiled and called")
    for amx in (True, False):
        monkeypatch.setattr(cpu_gemm, "_state", {})
        _claim(monkeypatch, "AVX512", amx=amx, bf16=True)
        assert cpu_gemm.kernel() is not None and cpu_gemm.kernel_bf16() is not None
    monkeypatch.setattr(cpu_gemm, "_state", {})
    _claim(monkeypatch, "AVX512", amx=False, bf16=False)  # AVX-512 without bf16 (Skylake-X)
    assert cpu_gemm.kernel_bf16() is None and cpu_gemm.kernel() is not None
    monkeypatch.setattr(cpu_gemm, "_state", {})
    _claim(monkeypatch, "DEFAULT", amx=True, bf16=True)
    assert cpu_gemm.kernel() is None


def test_bf16_layer_rewritten_with_amx_claimed(monkeypatch, fresh_kernels):
    """A bf16 fine-grained layer (E=16, k=4) compiled while the probes claim AMX: one MoE
    layer call recorded (the benchmark's check), through ``capmoe::experts_cpu``, and the
    output equal to eager within bf16 tolerance."""
    import capmoe_compile
    from capmoe_compile.lowering import grouped
    from capmoe_compile.testing import zoo

    _claim(monkeypatch, "AVX512", amx=True)
    monkeypatch.setattr(grouped, "CPU_OP_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = zoo.build(
            "mixtral", num_layers=1, hidden=256, ffn=256, num_experts=16, top_k=4,
            dtype=torch.bfloat16,
        )  # fmt: skip
        block = zoo.moe_layers(model)[0].block
        x = torch.randn(2, 24, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
        torch._dynamo.reset()
        cap = torch.compile(block, backend="capmoe", dynamic=False)
        with torch.no_grad():
            want = block(x)
            with capmoe_compile.record_stats() as st:
                got = cap(x)
        assert len(st.layers) == 1, capmoe_compile.explain(block)(x)
        got = got[0] if isinstance(got, tuple) else got
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
