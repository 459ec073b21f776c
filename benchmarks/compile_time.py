"""Cold compile time of a 2-layer zoo model: ``backend="capmoe"`` against Inductor's default.

    python -m benchmarks.compile_time                        # mixtral, 2 layers, median of 3
    python -m benchmarks.compile_time --families mixtral,qwen2_moe,olmoe,deepseek_v3 --reps 5
    python -m benchmarks.compile_time --out benchmarks/results/cpu_compile_time_<date>.json

The issue's bar: compiling a 2-layer zoo model with capmoe takes <= 1.25x the time Inductor's
default backend takes on the same model.

Every measurement is a cold compile: ``torch._dynamo.reset()`` first, Inductor's caches off
(``force_disable_caches``) and a fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` (``fresh_cache``), so
neither backend reuses anything compiled before, on disk or in memory. The time is the first
call of ``torch.compile(model, backend=...)`` on the model's input (Dynamo tracing, the backend,
Inductor's code generation and C++ compile, and the one forward), minus nothing. The two
backends are measured interleaved (each repetition compiles both, in alternating order) after
one untimed warm-up compile of each (imports, first-use initialisation), and the median of the
repetitions is reported. For capmoe the time spent in its passes (``run_passes``: find, verify
and rewrite the MoE layers) is recorded separately, as is the time in Inductor's
``compile_fx`` for both backends, so a miss can be attributed.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from typing import Any

import torch

import capmoe_compile
import capmoe_compile.passes
from capmoe_compile.testing import zoo

from .common import fmt_table, json_line, loadavg_end, machine, median, write_json

BAR = 1.25
CALL = {"use_cache": False}


@contextlib.contextmanager
def _timed_attr(obj: Any, name: str, acc: list[float]):
    """Wrap ``obj.name`` so that the seconds spent in each call are appended to ``acc``."""
    orig = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            acc.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, orig)


def cold_compile(model, ids, backend: str, dynamic: bool | None) -> dict[str, float]:
    """Seconds of one cold compile (first call) of ``model`` with ``backend``."""
    import torch._inductor.compile_fx as cfx

    torch._dynamo.reset()
    passes_s: list[float] = []
    inductor_s: list[float] = []
    with (
        torch._inductor.utils.fresh_cache(),
        torch._inductor.config.patch(force_disable_caches=True),
        _timed_attr(capmoe_compile.passes, "run_passes", passes_s),
        _timed_attr(cfx, "compile_fx", inductor_s),
        torch.no_grad(),
    ):
        fn = torch.compile(model, backend=backend, dynamic=dynamic)
        t0 = time.perf_counter()
        fn(ids, **CALL)
        total = time.perf_counter() - t0
        # the compiled code must be in use: a second call may not compile again
        t1 = time.perf_counter()
        fn(ids, **CALL)
        second = time.perf_counter() - t1
    torch._dynamo.reset()
    return {
        "total_s": total,
        "passes_s": sum(passes_s),
        # compile_fx recurses (inference graph -> compile_fx_inner); the outermost call is the max
        "compile_fx_s": max(inductor_s, default=0.0),
        "second_call_s": second,
    }


def measure(family: str, layers: int, reps: int, dynamic: bool | None, shape) -> dict:
    model = zoo.build(family, num_layers=layers)
    ids = zoo.random_input_ids(model, *shape, seed=0)
    backends = ("inductor", "capmoe")
    for b in backends:  # warm-up: imports and first-use initialisation, not timed
        cold_compile(model, ids, b, dynamic)
    samples: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    for r in range(reps):
        order = backends if r % 2 == 0 else backends[::-1]
        for b in order:
            samples[b].append(cold_compile(model, ids, b, dynamic))
    out: dict[str, Any] = {"family": family, "layers": layers, "reps": reps, "rows": {}}
    for b in backends:
        s = samples[b]
        out["rows"][b] = {
            "total_s": median([x["total_s"] for x in s]),
            "total_min_s": min(x["total_s"] for x in s),
            "total_max_s": max(x["total_s"] for x in s),
            "passes_s": median([x["passes_s"] for x in s]),
            "compile_fx_s": median([x["compile_fx_s"] for x in s]),
            "samples": s,
        }
    ind, cap = out["rows"]["inductor"]["total_s"], out["rows"]["capmoe"]["total_s"]
    out["ratio"] = cap / ind
    out["ok"] = out["ratio"] <= BAR
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="mixtral", help="comma list of zoo families")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="repetitions (median; >= 3)")
    p.add_argument(
        "--dynamic",
        choices=("none", "true", "false"),
        default="none",
        help="torch.compile's dynamic= (default None: static first compile)",
    )
    p.add_argument("--shape", default="2,32", help="input ids batch,seq")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    dynamic = {"none": None, "true": True, "false": False}[args.dynamic]
    warnings.filterwarnings("ignore", message=".*force disabled by torch.compiler.config")
    shape = tuple(int(s) for s in args.shape.split(","))

    info = machine()
    print(f"# compile_time benchmark  {info['date']}  {info['cpu']}  torch {info['torch']}")
    print(
        f"# threads {info['torch_threads']}/{info['cores']} cores, "
        f"load avg {info.get('loadavg_start')}"
    )
    t_start = time.perf_counter()
    results = []
    for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
        results.append(measure(fam, args.layers, args.reps, dynamic, shape))
    headers = ["model", "backend", "median s", "min", "max", "passes s", "compile_fx s", "ratio"]
    rows = []
    for r in results:
        for b, v in r["rows"].items():
            rows.append(
                [
                    f"{r['family']} x{r['layers']}",
                    b,
                    v["total_s"],
                    v["total_min_s"],
                    v["total_max_s"],
                    v["passes_s"] if b == "capmoe" else None,
                    v["compile_fx_s"],
                    f"{r['ratio']:.2f}x" if b == "capmoe" else None,
                ]
            )
    print(fmt_table(headers, rows))
    print(f"\n== issue bar: capmoe compile time <= {BAR}x Inductor's (cold, median)")
    print(
        fmt_table(
            ["model", "ratio", "target", ""],
            [
                [
                    f"{r['family']} x{r['layers']}",
                    f"{r['ratio']:.2f}x",
                    f"<= {BAR}x",
                    "PASS" if r["ok"] else "FAIL",
                ]
                for r in results
            ],
        )
    )
    loadavg_end(info)
    payload = {
        "benchmark": "compile_time",
        "args": vars(args),
        "machine": info,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    if args.out:
        write_json(args.out, payload)
        print(f"\n# wrote {args.out}")
    print(
        json_line(
            {
                "benchmark": "compile_time",
                "date": info["date"],
                "ratios": {r["family"]: round(r["ratio"], 3) for r in results},
                "seconds": {
                    f"{r['family']}/{b}": round(v["total_s"], 3)
                    for r in results
                    for b, v in r["rows"].items()
                },
                "bars_ok": sum(r["ok"] for r in results),
                "bars_total": len(results),
            }
        )
    )
    return payload


if __name__ == "__main__":
    main()
