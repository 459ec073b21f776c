"""Compile whatever Inductor compiles (issue 23, item 2): every transformers family at the tiny
config of ``benchmarks/coverage.py``, compiled with ``backend="inductor"`` and with
``backend="capmoe"`` (capacity off, the default), each against eager.

A family passes when capmoe compiles wherever Inductor compiles, and its max |compiled - eager|
is within ``max(2 * inductor's, 1e-5)``. Verdicts: ``ok``, ``capmoe fails`` (Inductor
compiled, capmoe raised), ``outside bound``, ``inductor fails`` (nothing to compare; capmoe's
outcome recorded too), ``build error`` (no tiny model).

With ``--no-inductor`` the two compiles are the cheap ones: Dynamo's ``backend="eager"`` against
the capmoe passes with the graphs run as FX (``coverage.PassesBackend``): the same traces,
the same capture-flag decisions, no Inductor (a Dynamo failure shows; a fusion difference
does not).

    python -m benchmarks.inductor_parity --families mixtral,gpt_oss --impl grouped_mm,eager \\
        --out benchmarks/results/inductor_parity.json
    python -m benchmarks.inductor_parity --no-inductor --out benchmarks/results/inductor_parity_fast.json

Each family runs in its own process, ``--timeout`` seconds, one at a time; the JSON is written
after each family, and ``--resume`` skips the entries it already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _diff(got, want) -> float:
    return float((got.float() - want.float()).abs().max())


def _compile(model, inputs: dict, backend) -> dict[str, Any]:
    import torch

    from benchmarks import coverage as cv

    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            got = cv.first_tensor(torch.compile(model, backend=backend)(**inputs))
        return {"ok": True, "got": got, "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - recorded
        return {"ok": False, "error": cv._short(e), "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        torch._dynamo.reset()


def check(family: str, impl: str, inductor: bool = True) -> dict[str, Any]:
    """One family and experts implementation: build, eager, the two compiles, the verdict."""
    import torch

    from benchmarks import coverage as cv
    from capmoe_compile import bridge

    rec: dict[str, Any] = {"family": family, "impl": impl}
    builder = cv._builder(family)
    try:
        if builder is None:
            raise RuntimeError("no text model for this config in the registry")
        model = cv.build_family(family, impl, builder)
        inputs = cv.model_inputs(model, builder)
        with torch.no_grad():
            want = cv.first_tensor(model(**inputs))
    except Exception as e:  # noqa: BLE001
        rec.update(verdict="build error", error=cv._short(e))
        return rec
    if impl not in cv.supported_impls(model) and impl != cv.IMPLS[0]:
        rec.update(verdict="unsupported", error="no transformers experts module to switch")
        return rec
    ref_backend = "inductor" if inductor else "eager"
    ours = "capmoe" if inductor else cv.PassesBackend()
    bridge.RETRACED.clear()
    for name, backend in ((ref_backend, ref_backend), ("capmoe", ours)):
        r = _compile(model, inputs, backend)
        got = r.pop("got", None)
        if got is not None:
            r["max_diff"] = _diff(got, want)
        rec[name] = r
    rec["retraced_without_flags"] = sorted(
        {f"{c.co_name} ({Path(c.co_filename).name}:{c.co_firstlineno})" for c in bridge.RETRACED}
    )
    ref, cap = rec[ref_backend], rec["capmoe"]
    if not ref["ok"]:
        rec["verdict"] = "inductor fails" if inductor else "eager backend fails"
    elif not cap["ok"]:
        rec["verdict"] = "capmoe fails"
    else:
        rec["bound"] = max(2 * ref["max_diff"], 1e-5)
        rec["verdict"] = "ok" if cap["max_diff"] <= rec["bound"] else "outside bound"
    return rec


def _worker(family: str, impl: str, inductor: bool) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    print("@@RESULT@@" + json.dumps(check(family, impl, inductor), default=str), flush=True)


def _meta(args) -> dict[str, Any]:
    import torch
    import transformers

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "command": "python -m benchmarks.inductor_parity " + " ".join(sys.argv[1:]),
        "mode": "inductor vs capmoe" if args.inductor else "eager vs capmoe passes (FX)",
        "git": rev,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated model types (default: all)")
    ap.add_argument("--impl", default="grouped_mm", help="comma-separated (default grouped_mm)")
    ap.add_argument("--no-inductor", dest="inductor", action="store_false")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per family and impl")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "inductor_parity.json"))
    ap.add_argument("--worker", nargs=2, metavar=("FAMILY", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(*args.worker, args.inductor)
        return
    from benchmarks import coverage as cv

    names = args.families.split(",") if args.families else sorted(cv.moe_families())
    out = Path(args.out)
    payload = json.loads(out.read_text()) if args.resume and out.exists() else {}
    results: dict[str, Any] = payload.get("results", {})
    meta = _meta(args)
    for family in names:
        for impl in args.impl.split(","):
            key = f"{family}/{impl}"
            if key in results:
                continue
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "benchmarks.inductor_parity", "--worker", family, impl]
            if not args.inductor:
                cmd.append("--no-inductor")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            try:
                p = subprocess.run(
                    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
                )
                lines = [x for x in p.stdout.splitlines() if x.startswith("@@RESULT@@")]
                rec = (
                    json.loads(lines[-1][len("@@RESULT@@") :])
                    if lines
                    else {"verdict": "worker died", "error": p.stderr[-600:]}
                )
            except subprocess.TimeoutExpired:
                rec = {"verdict": "timeout", "error": f"over {args.timeout} s"}
            rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
            results[key] = rec
            print(f"{key:40s} {rec['verdict']:16s} {rec['wall_seconds']:6.1f}s", flush=True)
            counts: dict[str, int] = {}
            for r in results.values():
                counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
            from benchmarks.common import with_isa  # imports torch: only when writing

            out.write_text(
                json.dumps(
                    with_isa({"meta": meta, "summary": counts, "results": results}), indent=1
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
