"""Probes behind issue 16's unmet CPU bars: where the F=16 overhead row and decode spend time.

    python -m benchmarks.layer_probes overhead --shapes qwen3@512,deepseek@512
    python -m benchmarks.layer_probes small-m                 # one expert GEMM at decode sizes
    python -m benchmarks.layer_probes small-groups            # many small experts: loop vs bmm
    python -m benchmarks.layer_probes small-m --inductor      # + Inductor's CPP GEMM template
    python -m benchmarks.layer_probes overhead --out benchmarks/results/x.json
    python -m benchmarks.layer_probes kernel-ab --shapes decode,fine  # few-row kernel on/off
    python -m benchmarks.layer_probes peak                    # mm GFLOP/s, fp32 and bf16

Every sample is timed by the calling thread's CPU time (``time.thread_time``) and, for the
layer rows, by the wall clock too: one intra-op thread by default, so all the work runs on the
calling thread and a loaded shared machine's descheduled time is not counted. Medians of
interleaved samples. The load average and thread count are printed and recorded.

- ``overhead``: capmoe ``score`` (gamma 1) on a ``benchmarks.moe_layer`` shape and on its F=16
  copy (same router; the lowering the full layer runs, forced), and the profiler's top ops of
  both: the F=16 row is the issue's "routing + capacity + dispatch + combine" probe.
- ``small-m``: one gate/up projection (``[M, H] x [H, 2F]``, H=1024, F=2048: the decode shape's
  expert) as ``x @ W^T``, ``W @ x^T``, MKL's packed GEMM and the experts op's few-row kernel
  (``lowering/cpu_gemm.py``), M = 1..32, against the weight bytes
  at the measured copy bandwidth; ``--inductor``: Inductor's max-autotune CPP/ATen GEMM
  (freezing on: the weight packed once) on the same sizes.
- ``kernel-ab``: capmoe off and score (and score on the F=16 copy) with the experts op's
  few-row kernel on and off (``lowering/cpu_gemm.py``), interleaved in one process.
- ``peak``: ``torch.mm`` GFLOP/s in fp32 and bf16 at a few sizes (the prefill expert's
  ``[512, 1024] x [1024, 4096]`` among them): whether bf16 is worth measuring on this CPU
  (without AVX-512 BF16 or AMX, ATen's bf16 GEMM is a slow fallback).
- ``small-groups``: the per-expert loop of ``capmoe::experts_cpu`` (gate/up mm, SiLU * up, down
  mm) on 70-120 active experts of 11-17 rows each against one ``bmm`` over the gathered weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as Fn

from .common import json_line, machine, write_json


def _layer_and_tiny_copy(spec: str):
    """``shape[@T]`` of moe_layer's full shapes: T, the layer's config, its input, and the layer
    and its F=TINY_F copy, each compiled with capmoe (static shapes)."""
    from . import moe_layer as ml

    base, _, t = spec.partition("@")
    lname, T0 = ml.SHAPES_FULL[base]
    T = int(t) if t else T0
    cfg = ml.LAYERS_FULL[lname]
    _, block, x_all = ml.build_layer(cfg, torch.float32, 1.5, T)
    _, tiny = ml.tiny_copy(cfg, block, torch.float32)
    x = ml.decode_input(x_all, T) if base == "decode" else ml.prefill_input(x_all, T)
    full = torch.compile(block, backend="capmoe", dynamic=False)
    small = torch.compile(tiny, backend="capmoe", dynamic=False)
    return T, cfg, x, full, small


def _t(f, n: int = 9) -> float:
    """Median thread CPU time of ``f`` in ms (two warm-up calls)."""
    f()
    f()
    ts = []
    for _ in range(n):
        c0 = time.thread_time()
        f()
        ts.append(time.thread_time() - c0)
    return sorted(ts)[n // 2] * 1e3


def overhead(shapes: list[str], reps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    import capmoe_compile  # noqa: F401 - registers the backend

    from . import moe_layer as ml

    torch._dynamo.config.recompile_limit = 64
    out = {}
    for spec in shapes:
        T, cfg, x, full, small = _layer_and_tiny_copy(spec)
        rows = {
            "full_score": ml._patched(full, ml.SCORE),
            f"F{ml.TINY_F}_score": ml._patched(small, ml.SCORE),
        }
        with torch.no_grad():
            for r, fn in rows.items():
                with ml._same_lowering("@F" if r.startswith("F") else ""):
                    fn(x)
            samples = {r: [] for r in rows}
            names = list(rows)
            for i in range(reps):
                for j in range(len(names)):
                    r = names[(i + j) % len(names)]
                    c0, w0 = time.thread_time(), time.perf_counter()
                    rows[r](x)
                    samples[r].append((time.perf_counter() - w0, time.thread_time() - c0))
        res = {}
        for r, s in samples.items():
            wall = sorted(a for a, _ in s)[len(s) // 2]
            thr = sorted(b for _, b in s)[len(s) // 2]
            res[r] = {"wall_ms": 1e3 * wall, "thread_ms": 1e3 * thr}
            print(f"{spec} {r:12s} wall {1e3 * wall:8.2f} ms  thread {1e3 * thr:8.2f} ms")
        tiny_name = f"F{ml.TINY_F}_score"
        frac = res[tiny_name]["thread_ms"] / res["full_score"]["thread_ms"]
        print(f"{spec} F={ml.TINY_F} row / layer (score, thread time): {frac:.3f}")
        prof = {}
        for r in rows:
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(3):
                    rows[r](x)
            ev = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            prof[r] = [
                {"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 3e3, "calls": e.count / 3}
                for e in ev[:12]
            ]
            print(f"  profile {r} (self CPU, per call, under the profiler):")
            for e in prof[r]:
                print(f"    {e['op'][:60]:60s} {e['self_ms_per_call']:8.3f} ms {e['calls']:6.0f}")
        out[spec] = {"T": T, "cfg": cfg, "rows": res, "F16_over_layer_thread": frac}
        out[spec]["profile"] = prof
        del full, small, rows
        torch._dynamo.reset()
    return out


def kernel_ab(shapes: list[str], reps: int) -> dict:
    """capmoe off and score on each shape (and score on its F=16 copy), each with the few-row
    kernel on and off (``cpu_gemm.disabled()``: ``torch.mm`` and the transposed-group rule),
    interleaved in one process: thread time and wall, medians."""
    import capmoe_compile  # noqa: F401 - registers the backend
    from capmoe_compile.lowering import cpu_gemm

    from . import moe_layer as ml

    torch._dynamo.config.recompile_limit = 64
    out = {}
    for spec in shapes:
        T, cfg, x, full, small = _layer_and_tiny_copy(spec)
        with torch.no_grad():
            with ml._same_lowering("@F"):
                small(x)
            full(x)
        base_rows = {
            "off": full,
            "score": ml._patched(full, ml.SCORE),
            f"F{ml.TINY_F}_score": ml._patched(small, ml.SCORE),
        }

        def variant(fn, on: bool):
            def run(inp):
                if on:
                    return fn(inp)
                with cpu_gemm.disabled():
                    return fn(inp)

            return run

        rows = {
            f"{r}_{k}": variant(fn, k == "kernel")
            for r, fn in base_rows.items()
            for k in ("kernel", "mm")
        }
        with torch.no_grad():
            for fn in rows.values():
                fn(x)
            names = list(rows)
            samples = {r: [] for r in names}
            for i in range(reps):
                for j in range(len(names)):
                    r = names[(i + j) % len(names)]
                    c0, w0 = time.thread_time(), time.perf_counter()
                    rows[r](x)
                    samples[r].append((time.perf_counter() - w0, time.thread_time() - c0))
        res = {}
        for r, s in samples.items():
            wall = sorted(a for a, _ in s)[len(s) // 2]
            thr = sorted(b for _, b in s)[len(s) // 2]
            res[r] = {"wall_ms": 1e3 * wall, "thread_ms": 1e3 * thr}
        for r in base_rows:
            on, off = res[f"{r}_kernel"]["thread_ms"], res[f"{r}_mm"]["thread_ms"]
            print(
                f"{spec} {r:10s} thread ms: kernel {on:8.2f}  mm {off:8.2f}  ({off / on:.2f}x)"
                f"   wall: {res[f'{r}_kernel']['wall_ms']:8.2f} / {res[f'{r}_mm']['wall_ms']:8.2f}"
            )
        frac = {
            k: res[f"F{ml.TINY_F}_score_{k}"]["thread_ms"] / res[f"score_{k}"]["thread_ms"]
            for k in ("kernel", "mm")
        }
        print(f"{spec} F={ml.TINY_F} row / layer (score, thread time): {frac}")
        out[spec] = {"T": T, "cfg": cfg, "rows": res, "F16_over_layer_thread": frac}
        del full, small, rows, base_rows
        torch._dynamo.reset()
    return out


def small_m(inductor: bool) -> dict:
    H, F = 1024, 2048
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2 * F, H, generator=g) / 32
    src = torch.empty(64 << 20)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (_t(lambda: dst.copy_(src), 7) / 1e3) / 1e9
    floor_ms = W.numel() * 4 / bw / 1e6
    print(f"copy bandwidth {bw:.1f} GB/s (thread time); weight {W.numel() * 4 / 1e6:.1f} MB")
    print(f"  -> bytes floor {floor_ms:.2f} ms per projection")
    out = {"bandwidth_gbs": bw, "bytes_floor_ms": floor_ms, "rows": {}}
    from capmoe_compile.lowering import cpu_gemm

    kern = cpu_gemm.kernel()
    lin = torch.nn.Linear(H, 2 * F, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    for M in (1, 2, 4, 10, 16, 32):
        x = torch.randn(M, H, generator=g)
        r = {
            "x@W^T": _t(lambda x=x: torch.mm(x, W.t())),
            "W@x^T": _t(lambda x=x: torch.mm(W, x.t())),
        }
        pk = torch.ops.mkl._mkl_reorder_linear_weight(W, M)
        r["mkl_packed"] = _t(lambda x=x, pk=pk, M=M: torch.ops.mkl._mkl_linear(x, pk, W, None, M))
        if kern is not None:  # what capmoe::experts_cpu runs for few rows (lowering/cpu_gemm.py)
            y = torch.empty(M, 2 * F)
            r["capmoe_kernel"] = _t(lambda x=x, y=y: cpu_gemm.mm_nt(x, W, y, kern))
        if inductor:
            import torch._inductor.config as ic

            torch._dynamo.reset()
            with (
                torch.no_grad(),
                ic.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"),
            ):
                c = torch.compile(lin)
                c(x)
                torch.testing.assert_close(c(x), lin(x), atol=1e-4, rtol=1e-4)
                r["inductor_cpp_template"] = _t(lambda x=x, c=c: c(x))
        out["rows"][M] = r
        cells = "  ".join(f"{k} {v:.2f}" for k, v in r.items())
        print(f"M={M:3d}  {cells}  ms  (best / bytes floor {min(r.values()) / floor_ms:.1f}x)")
    return out


def small_groups() -> dict:
    H = 1024
    g = torch.Generator().manual_seed(0)
    out = {}
    for F, E, n_act, rows in ((16, 256, 120, 11), (512, 256, 120, 11), (16, 128, 70, 17)):
        Wgu = torch.randn(E, 2 * F, H, generator=g) / 32
        Wd = torch.randn(E, H, F, generator=g) / 32
        act = torch.randperm(E, generator=g)[:n_act].sort().values.tolist()
        idx = torch.tensor(act)
        xs = torch.randn(n_act * rows, H, generator=g)

        def loop(xs=xs, Wgu=Wgu, Wd=Wd, act=act, rows=rows):
            y = torch.empty_like(xs)
            for i, e in enumerate(act):
                gu = torch.mm(xs[i * rows : (i + 1) * rows], Wgu[e].t())
                gt, up = gu.chunk(2, -1)
                h = Fn.silu(gt, inplace=True).mul_(up)
                torch.mm(h, Wd[e].t(), out=y[i * rows : (i + 1) * rows])
            return y

        def bmm(xs=xs, Wgu=Wgu, Wd=Wd, idx=idx, n=n_act, rows=rows):
            gu = torch.bmm(xs.view(n, rows, H), Wgu[idx].transpose(1, 2))
            gt, up = gu.chunk(2, -1)
            h = Fn.silu(gt).mul_(up)
            return torch.bmm(h, Wd[idx].transpose(1, 2)).reshape(-1, H)

        def gate_up_only(xs=xs, Wgu=Wgu, act=act, rows=rows):
            for i, e in enumerate(act):
                torch.mm(xs[i * rows : (i + 1) * rows], Wgu[e].t())

        torch.testing.assert_close(loop(), bmm(), atol=1e-3, rtol=1e-3)
        r = {
            "loop_ms": _t(loop),
            "bmm_gathered_ms": _t(bmm),
            "gate_up_mm_only_ms": _t(gate_up_only),
        }
        r["per_expert_us"] = 1e3 * r["loop_ms"] / n_act
        out[f"F{F}_E{E}_{n_act}x{rows}"] = r
        print(
            f"F={F} E={E}: {n_act} active experts x {rows} rows: loop {r['loop_ms']:.2f} ms "
            f"({r['per_expert_us']:.0f} us per expert; its gate/up mm calls alone "
            f"{r['gate_up_mm_only_ms']:.2f} ms), bmm over gathered weights "
            f"{r['bmm_gathered_ms']:.2f} ms"
        )
    return out


def peak() -> dict:
    """``torch.mm`` GFLOP/s (thread time, median of 3) for fp32 and bf16."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for m, k, n in ((256, 256, 256), (512, 1024, 4096)):
            a = torch.randn(m, k).to(dtype)
            b = torch.randn(k, n).to(dtype)
            ms = _t(lambda a=a, b=b: torch.mm(a, b), 3)
            gf = 2 * m * k * n / (ms / 1e3) / 1e9
            out[f"{name} {m}x{k}x{n}"] = {"ms": ms, "gflops": gf}
            print(f"{name} mm [{m}, {k}] x [{k}, {n}]: {ms:.2f} ms, {gf:.2f} GFLOP/s")
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(f"ATen CPU capability: {out['cpu_capability']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["overhead", "small-m", "small-groups", "kernel-ab", "peak"])
    p.add_argument("--shapes", default="qwen3@512,deepseek@512", help="overhead: moe_layer shapes")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inductor", action="store_true", help="small-m: + Inductor CPP template")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"# layer_probes {args.probe}  {info['date']}  {info['cpu']}  torch {info['torch']}")
    print(f"# threads {info['torch_threads']}/{info['cores']}, load avg {info['loadavg_start']}")
    if args.probe == "overhead":
        res = overhead([s for s in args.shapes.split(",") if s], args.reps)
    elif args.probe == "kernel-ab":
        res = kernel_ab([s for s in args.shapes.split(",") if s], args.reps)
    elif args.probe == "small-m":
        res = small_m(args.inductor)
    elif args.probe == "peak":
        res = peak()
    else:
        res = small_groups()
    info["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": f"layer_probes {args.probe}", "args": vars(args), "machine": info}
    payload["results"] = res
    if args.out:
        write_json(args.out, payload)
        print(f"# wrote {args.out}")
    print(json_line({"benchmark": payload["benchmark"], "load_end": info["loadavg_end"]}))
    sys.stdout.flush()
    return payload


if __name__ == "__main__":
    main()
