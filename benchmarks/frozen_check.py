"""Frozen (packed) expert weights on layers this project did not write: every zoo family of
transformers' MoE blocks (``capmoe_compile.testing.zoo``), fp32 and bf16.

    python -m benchmarks.frozen_check                  # every family, fp32 and bf16
    python -m benchmarks.frozen_check --families mixtral,qwen3_moe --dtypes fp32

Each block (one layer, H = F = 256, E = 8, k = 2: the packed kernels need ``in >= 256``) is
compiled with ``backend="capmoe"`` on the CPU op (``grouped.CPU_OP_MIN_WEIGHTS`` set to 0 for
these small weights), one intra-op thread. Per family and dtype it prints how many weights
``freeze_experts`` froze, how many products the packed kernel computed, whether the frozen
layer with capacity off equals eager (fp32 1e-4, bf16 3e-2, relative to the output's scale)
and whether it equals the same compiled layer before freezing with capacity on (gamma 0.5,
``score``; the unfrozen op is checked against SPEC's reference by the tests). Exits 1 if any
family that built disagrees. Needs a CPU with the packed kernels (AVX-512; AVX-512 bf16).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def check(family: str, dtype: torch.dtype, calls: dict) -> dict:
    import capmoe_compile
    from capmoe_compile.testing import zoo

    model = zoo.build(
        family, num_layers=1, hidden=256, ffn=256, num_experts=8, top_k=2, dtype=dtype
    )  # fmt: skip
    block = zoo.moe_layers(model)[0].block
    x = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch._dynamo.reset()
    cap = torch.compile(block, backend="capmoe", dynamic=False)
    with torch.no_grad():
        want = _first(block(x)).float()
        with capmoe_compile.config.patch(capacity_factor=0.5):
            on_unfrozen = _first(cap(x)).float()
        frozen = capmoe_compile.freeze_experts(block)
        before = calls.get(dtype, 0)
        off = _first(cap(x)).float()
        with capmoe_compile.config.patch(capacity_factor=0.5):
            on = _first(cap(x)).float()
        used = calls.get(dtype, 0) - before
    capmoe_compile.thaw_experts(block)
    torch._dynamo.reset()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = max(1.0, want.abs().max().item())
    return {
        "frozen": frozen,
        "packed_calls": used,
        "off_vs_eager": (off - want).abs().max().item(),
        "on_vs_unfrozen": (on - on_unfrozen).abs().max().item(),
        "ok": torch.allclose(off, want, atol=tol * scale, rtol=tol)
        and torch.allclose(on, on_unfrozen, atol=tol * scale, rtol=tol),
    }


def main(argv: list[str] | None = None) -> int:
    from capmoe_compile.lowering import cpu_packed, grouped
    from capmoe_compile.testing import zoo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(zoo.FAMILIES))
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    grouped.CPU_OP_MIN_WEIGHTS = 0
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    calls: dict = {}
    for d in args.dtypes.split(","):
        fn = cpu_packed.kernel(dtypes[d])
        if fn is None:
            print(f"({d}: no packed kernel on this CPU)")
            continue

        def counted(*a, fn=fn, dt=dtypes[d]):
            calls[dt] = calls.get(dt, 0) + 1
            return fn(*a)

        cpu_packed._fns[dtypes[d]] = counted
    bad = 0
    for family in args.families.split(","):
        for d in args.dtypes.split(","):
            if cpu_packed._fns.get(dtypes[d]) is None:
                continue
            try:
                r = check(family, dtypes[d], calls)
            except Exception as e:  # noqa: BLE001 - a family that does not build at this size
                print(f"{family:18s} {d}  not run: {type(e).__name__}: {str(e)[:80]}")
                continue
            bad += not r["ok"]
            print(
                f"{family:18s} {d}  frozen {r['frozen']}  packed calls {r['packed_calls']:3d}"
                f"  off vs eager {r['off_vs_eager']:.2g}  on vs unfrozen {r['on_vs_unfrozen']:.2g}"
                f"  {'ok' if r['ok'] else 'WRONG'}",
                flush=True,
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
