"""Packed expert weights (``capmoe_compile/lowering/cpu_packed.py``) against the weight as stored,
one product at a time, in one process, interleaved.

    python -m benchmarks.packed_ab --out benchmarks/results/packed_ab_avx512_<date>.json
    python -m benchmarks.packed_ab --quick          # small shapes, few rounds (smoke run)

``y = x @ w.T`` for ``M`` rows against ``[out, in]`` weights, one intra-op thread,
``time.thread_time`` (the calling thread's CPU time), each timed call over 8 distinct weights
(an MoE layer reads each expert's weight from memory once per call; one weight repeated would
sit in cache), rows interleaved round-robin, medians and the median over rounds of each round's
ratio. Rows: ``packed`` (the packed kernel, the weights packed beforehand: what
``capmoe_compile.freeze_experts`` gives), ``few_row`` (``cpu_gemm``'s kernel on the weight as
stored; only up to 64 rows, where the op would use it) and ``torch_mm`` (MKL in fp32, oneDNN in
bf16). Each packed product is checked against a float64 product first. The layer-level figure
(the compiled MoE layer frozen and not, interleaved) is ``benchmarks.moe_layer --frozen``'s
``capmoe_off`` against ``capmoe_off_unfrozen``.

Only on CPUs where the packed kernels exist (AVX-512 for fp32, AVX-512 bf16 for bf16). The
machine's ISA and load average are in the JSON (``common.write_json``).
"""

from __future__ import annotations

import argparse
import os

import torch

from .common import isa_line, json_line, loadavg_end, machine, median, write_json
from .cpu_gemm_ab import _rounds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = ((4096, 1024), (1024, 2048), (1024, 512), (1536, 1024))
FEW_ROW_MAX = 64


def _check(fn, x, p, w, N) -> None:
    y = torch.empty(len(x), N, dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), p.data_ptr(), 0, y.data_ptr(), y.stride(0), len(x), N, x.shape[1])
    ref = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    rel = 2**-8 if x.dtype == torch.bfloat16 else 0.0
    assert ((y.double() - ref).abs() <= rel * ref.abs() + 1e-5 * bound).all()


def products(dtype, rows, shapes, reps, n_weights=8) -> list[dict]:
    from capmoe_compile.lowering import cpu_gemm, cpu_packed

    packed_fn = cpu_packed.kernel(dtype)
    few = cpu_gemm.kernel() if dtype == torch.float32 else cpu_gemm.kernel_bf16()
    gen = torch.Generator().manual_seed(0)
    out = []
    for N, K in shapes:
        ws = [torch.randn(N, K, generator=gen).to(dtype) for _ in range(n_weights)]
        ps = [cpu_packed.pack(w[None])[0] for w in ws]
        for M in rows:
            x = torch.randn(M, K, generator=gen).to(dtype)
            _check(packed_fn, x, ps[0], ws[0], N)
            y = torch.empty(M, N, dtype=dtype)
            shape = (M, N, K)
            xa, ya = (x.data_ptr(), K), (y.data_ptr(), N)

            def run_packed(ps=ps, xa=xa, ya=ya, shape=shape):
                for p in ps:
                    packed_fn(*xa, p.data_ptr(), 0, *ya, *shape)

            def run_few(ws=ws, xa=xa, ya=ya, shape=shape):
                for w in ws:
                    few(*xa, w.data_ptr(), shape[2], *ya, *shape)

            def run_mm(ws=ws, x=x, y=y):
                for w in ws:
                    torch.mm(x, w.t(), out=y)

            fns = {"packed": run_packed, "torch_mm": run_mm}
            if few is not None and M <= FEW_ROW_MAX:
                fns["few_row"] = run_few
            t = _rounds(fns, reps, per_call=len(ws))
            row = {"dtype": str(dtype).removeprefix("torch."), "M": M, "out": N, "in": K}
            row["ms"] = {n: 1e3 * median(v) for n, v in t.items()}
            row["samples_ms"] = {n: [1e3 * s for s in v] for n, v in t.items()}
            for n in fns:  # > 1: packed faster
                if n != "packed":
                    row[f"{n}_over_packed"] = median(
                        [a / b for a, b in zip(t[n], t["packed"], strict=True)]
                    )
            row["packed_gflops"] = 2 * M * N * K / (row["ms"]["packed"] * 1e6)
            out.append(row)
            few_s = f"  few_row/packed {row['few_row_over_packed']:.2f}" if "few_row" in fns else ""
            print(
                f"{row['dtype']} M={M:4d} [{N}x{K}]  packed {row['ms']['packed']:.3f} ms"
                f" ({row['packed_gflops']:.0f} GFLOP/s)  mm/packed"
                f" {row['torch_mm_over_packed']:.2f}{few_s}",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rows", default="1,2,4,8,15,32,64,128,256,512", help="rows M")
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke run)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from capmoe_compile.lowering import cpu_packed

    info = machine()
    print(isa_line(info["isa"]))
    reps = 3 if args.quick else args.reps
    shapes = ((64, 256),) if args.quick else SHAPES
    rows = [int(r) for r in args.rows.split(",") if r]
    if args.quick:
        rows = [r for r in rows if r <= 16] or [1, 8]
    payload: dict = {"benchmark": "packed_ab", "args": vars(args), "machine": info}
    payload["max_rows"] = {str(k).removeprefix("torch."): v for k, v in cpu_packed.MAX_ROWS.items()}
    payload["products"] = []
    for d in (s.strip() for s in args.dtypes.split(",") if s.strip()):
        dtype = DTYPES[d]
        if cpu_packed.kernel(dtype) is None:
            print(f"({d}: no packed kernel on this CPU; skipped)")
            continue
        payload["products"] += products(dtype, rows, shapes, reps)
    loadavg_end(info)
    print(f"load {info.get('loadavg_start')} at start, {info.get('loadavg_end')} at end")
    if args.out:
        write_json(args.out, payload)
        print(f"# wrote {args.out}")
    print(json_line({"benchmark": "packed_ab", "load": os.getloadavg()}))
    return payload


if __name__ == "__main__":
    main()
