"""The few-row CPU GEMM kernels (``capmoe_compile/lowering/cpu_gemm.py``) against their previous
settings, in one process, interleaved: where the weight-block prefetch goes (L1, ``T0``, or
L2, ``T1``: ``cpu_gemm.PREFETCH_HINT``) and how many rows the bf16 kernel takes
(``cpu_gemm.MAX_ROWS_BF16``, was 4).

    python -m benchmarks.cpu_gemm_ab --out benchmarks/results/cpu_gemm_ab_avx512_<date>.json
    python -m benchmarks.cpu_gemm_ab --quick          # small shapes, few reps (smoke run)

Two parts, one intra-op thread, ``time.thread_time`` (the calling thread's CPU time; on a
shared machine descheduled time is not counted), rows interleaved round-robin, medians and the
median over rounds of each round's ratio:

- ``products``: ``y = x @ w.T`` for ``M`` rows against ``[out, in]`` weights, each timed call
  running over 8 distinct weights (an MoE layer reads each expert's weight from memory once
  per call; one weight repeated would sit in cache): the kernel with prefetch T0 and T1, and
  ``torch.mm`` (MKL in fp32, oneDNN in bf16);
- ``decode``: the decode layer of ``benchmarks/moe_layer.py`` (T=16, H=1024, F=2048, E=8,
  k=2, skewed router, capacity off) compiled with ``backend="capmoe"``, its
  ``capmoe::experts_cpu`` calls run with the previous kernels (T0, bf16 up to 4 rows) and the
  current ones, alternately; outputs of both compared (the prefetch does not change the
  arithmetic: equal bit for bit).

Only on x86-64 CPUs where the kernels exist (``cpu_gemm.kernel()``; bf16 parts need AVX-512
bf16). The machine's ISA and load average are in the JSON (``common.write_json``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch

from .common import fmt_table, isa_line, json_line, loadavg_end, machine, median, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _load(src: str, name: str):
    from torch._inductor.codecache import CppCodeCache

    fn = getattr(CppCodeCache.load(src), name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


def kernels(dtype: torch.dtype) -> dict[str, object]:
    """The kernel of ``dtype`` compiled with each prefetch hint."""
    from capmoe_compile.lowering import cpu_gemm as g

    src, name = (
        (g._SRC, "capmoe_gemm_nt_f32")
        if dtype == torch.float32
        else (g._SRC_BF16, "capmoe_gemm_nt_bf16")
    )
    return {f"kernel_{h}": _load(g._with_hint(src, h), name) for h in ("T0", "T1")}


def _rounds(fns: dict, reps: int, per_call: int = 1) -> dict[str, list[float]]:
    t: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(reps):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            t0 = time.thread_time()
            fns[n]()
            t[n].append((time.thread_time() - t0) / per_call)
    return t


def products(dtype, rows, shapes, reps, n_weights=8) -> list[dict]:
    from capmoe_compile.lowering import cpu_gemm as g

    ks = kernels(dtype)
    gen = torch.Generator().manual_seed(0)
    out = []
    for N, K in shapes:
        ws = [torch.randn(N, K, generator=gen).to(dtype) for _ in range(n_weights)]
        for M in rows:
            x = torch.randn(M, K, generator=gen).to(dtype)
            ys = {n: torch.empty(M, N, dtype=dtype) for n in (*ks, "torch_mm")}
            for n, fn in ks.items():
                g.mm_nt(x, ws[0], ys[n], fn)
            assert torch.equal(ys["kernel_T0"], ys["kernel_T1"])
            fns = {
                n: (lambda fn=fn, y=ys[n], x=x, ws=ws: [g.mm_nt(x, w, y, fn) for w in ws])
                for n, fn in ks.items()
            }
            fns["torch_mm"] = lambda y=ys["torch_mm"], x=x, ws=ws: [
                torch.mm(x, w.t(), out=y) for w in ws
            ]
            t = _rounds(fns, reps, per_call=len(ws))
            row = {"dtype": str(dtype).removeprefix("torch."), "M": M, "out": N, "in": K}
            row["ms"] = {n: 1e3 * median(v) for n, v in t.items()}
            row["samples_ms"] = {n: [1e3 * s for s in v] for n, v in t.items()}
            for n in ("kernel_T0", "torch_mm"):  # > 1: T1 faster
                row[f"{n}_over_T1"] = median(
                    [a / b for a, b in zip(t[n], t["kernel_T1"], strict=True)]
                )
            out.append(row)
            print(
                f"{row['dtype']} M={M:3d} [{N}x{K}]  T0 {row['ms']['kernel_T0']:.3f}  T1"
                f" {row['ms']['kernel_T1']:.3f}  torch.mm {row['ms']['torch_mm']:.3f} ms;"
                f"  T0/T1 {row['kernel_T0_over_T1']:.2f}  mm/T1 {row['torch_mm_over_T1']:.2f}",
                flush=True,
            )
    return out


def decode(dtype, reps, quick=False) -> dict:
    """The decode layer, previous kernels against current ones (module docstring)."""
    import capmoe_compile
    from capmoe_compile.lowering import cpu_gemm as g

    from . import moe_layer as ml

    cfg = (ml.LAYERS_QUICK if quick else ml.LAYERS_FULL)["e8"]
    T = ml.SHAPES_QUICK["decode"][1] if quick else ml.SHAPES_FULL["decode"][1]
    model, block, x_all = ml.build_layer(cfg, dtype, 1.5, T)
    x = ml.decode_input(x_all, T)
    cur = {"fn": g.kernel(), "bf16": g.kernel_bf16(), "rows": g.MAX_ROWS_BF16}
    prev = dict(cur, rows=4)
    if dtype == torch.float32:
        prev["fn"] = kernels(dtype)["kernel_T0"]
    else:
        prev["bf16"] = kernels(dtype)["kernel_T0"]
    saved = dict(cur)

    def use(v):
        g._state["fn"], g._state["bf16"], g.MAX_ROWS_BF16 = v["fn"], v["bf16"], v["rows"]

    cap = torch.compile(block, backend="capmoe", dynamic=False)
    try:
        with torch.no_grad():
            ref = block(x)
            got = {}
            for name, v in (("previous", prev), ("current", cur)):
                use(v)
                got[name] = cap(x)
            with capmoe_compile.record_stats() as st:
                cap(x)

            def call(v):
                return lambda: (use(v), cap(x))

            t = _rounds({"previous": call(prev), "current": call(cur)}, reps)
    finally:
        use(saved)
        torch._dynamo.reset()
    res = {
        "dtype": str(dtype).removeprefix("torch."),
        "T": T,
        **cfg,
        "loads": st.layers[0].loads_before.tolist(),
        "ms": {n: 1e3 * median(v) for n, v in t.items()},
        "samples_ms": {n: [1e3 * s for s in v] for n, v in t.items()},
        "previous_over_current": median(
            [a / b for a, b in zip(t["previous"], t["current"], strict=True)]
        ),
        "max_abs_previous_vs_current": float((got["previous"] - got["current"]).abs().max()),
        "max_abs_current_vs_hf": float((got["current"].float() - ref.float()).abs().max()),
    }
    print(
        f"decode {res['dtype']} loads {res['loads']}: previous {res['ms']['previous']:.2f} ms,"
        f" current {res['ms']['current']:.2f} ms, per round {res['previous_over_current']:.2f}x;"
        f" |previous - current| {res['max_abs_previous_vs_current']:.1e}",
        flush=True,
    )
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rows", default="1,2,4,8,10,15,24", help="rows M of the products")
    p.add_argument("--reps", type=int, default=9, help="interleaved rounds (decode: x3)")
    p.add_argument("--no-decode", action="store_true", help="the products only")
    p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke run)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from capmoe_compile.lowering import cpu_gemm as g

    info = machine()
    print(isa_line(info["isa"]))
    reps = 3 if args.quick else args.reps
    shapes = ((256, 256),) if args.quick else ((4096, 1024), (1024, 2048))
    rows = [int(r) for r in args.rows.split(",") if r]
    payload: dict = {"benchmark": "cpu_gemm_ab", "args": vars(args), "machine": info}
    payload["prefetch_hint"] = g._hint()
    payload["max_rows_bf16"] = g.MAX_ROWS_BF16
    payload["products"], payload["decode"] = [], []
    for d in (s.strip() for s in args.dtypes.split(",") if s.strip()):
        dtype = DTYPES[d]
        have = g.kernel() if dtype == torch.float32 else g.kernel_bf16()
        if have is None:
            print(f"({d}: no kernel on this CPU; skipped)")
            continue
        payload["products"] += products(dtype, rows, shapes, reps)
        if not args.no_decode:
            payload["decode"].append(decode(dtype, 3 * reps, args.quick))
    loadavg_end(info)
    if payload["decode"]:
        print(
            fmt_table(
                ["dtype", "previous ms", "current ms", "previous / current"],
                [
                    [r["dtype"], r["ms"]["previous"], r["ms"]["current"]]
                    + [f"{r['previous_over_current']:.2f}x"]
                    for r in payload["decode"]
                ],
            )
        )
    print(f"load {info.get('loadavg_start')} at start, {info.get('loadavg_end')} at end")
    if args.out:
        write_json(args.out, payload)
        print(f"# wrote {args.out}")
    print(json_line({"benchmark": "cpu_gemm_ab", "load": os.getloadavg()}))
    return payload


if __name__ == "__main__":
    main()
