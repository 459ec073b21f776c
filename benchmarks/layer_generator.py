"""Differential check of thousands of generated MoE layers (``capmoe_compile.testing.generator``).

For every layer: compiled with capacity off == eager; for every layer capmoe rewrites,
compiled with capacity on == the SPEC oracle built on ``capmoe_compile.route`` (policies
score, order, reroute, random, switched at run time). Prints "generated / matched / refused /
wrong" and writes every outcome to ``benchmarks/results/layer_generator.json``. Wrong must be 0.

    python -m benchmarks.layer_generator --n 2000 --jobs 2
    python -m benchmarks.layer_generator --n 50 --inductor   # through Inductor too (slower)

Each layer is one Dynamo trace (about a second on one core), so the default run takes a while;
``--jobs`` runs chunks in parallel processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import time
import traceback
from pathlib import Path

from .common import machine

RESULTS = Path(__file__).parent / "results"


def _run_chunk(args: tuple[int, int, int, bool]) -> list[dict]:
    import torch

    from capmoe_compile.testing import generator as G

    start, stop, seed, inductor = args
    torch.set_num_threads(1)
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    rows = []
    for spec in G.specs(stop, seed=seed)[start:stop]:
        t = time.perf_counter()
        try:
            o = G.check(spec, inductor=inductor)
            row = {"verdict": o.verdict, "reason": o.reason, "wrong": o.wrong}
        except Exception as e:  # a crash is reported as wrong: the user's compile failed
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            row = {"verdict": "wrong", "reason": "", "wrong": f"compile/run raised: {tb[:400]}"}
        row.update(layer=spec.ident, expected_match=spec.expected_match)
        row["seconds"] = round(time.perf_counter() - t, 3)
        rows.append(row)
        print(f"{row['verdict']:>8} {row['seconds']:6.2f}s {spec.ident}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--inductor", action="store_true", help="compile through Inductor too")
    ap.add_argument("--out", default=str(RESULTS / "layer_generator.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    step = max(1, min(50, args.n // max(args.jobs, 1)))
    chunks = [(i, min(i + step, args.n), args.seed, args.inductor) for i in range(0, args.n, step)]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = [r for chunk in pool.imap(_run_chunk, chunks) for r in chunk]
    else:
        rows = [r for c in chunks for r in _run_chunk(c)]
    counts = collections.Counter(r["verdict"] for r in rows)
    reasons = collections.Counter(
        r["reason"].split(":")[0] for r in rows if r["verdict"] == "refused"
    )
    # refusals of layers SPEC lets capmoe rewrite: coverage to win (not errors)
    missed = collections.Counter(
        r["layer"].split("-")[0] + "/" + r["layer"].split("-")[1]
        for r in rows
        if r["verdict"] == "refused" and r["expected_match"]
    )
    summary = {
        "generated": len(rows),
        "matched": counts["matched"],
        "refused": counts["refused"],
        "wrong": counts["wrong"],
        "refused_but_rewritable": sum(missed.values()),
        "seed": args.seed,
        "inductor": args.inductor,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    print(
        f"\nlayers generated {summary['generated']} / matched {summary['matched']} / refused "
        f"{summary['refused']} / wrong {summary['wrong']}  ({summary['seconds']} s)"
    )
    for r in rows:
        if r["verdict"] == "wrong":
            print(f"  WRONG {r['layer']}: {r['wrong']}")
    print("refusal reasons:")
    for reason, n in reasons.most_common():
        print(f"  {n:5d}  {reason}")
    print("rewritable spellings refused (router/dispatch):")
    for what, n in missed.most_common():
        print(f"  {n:5d}  {what}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "layers": rows}, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
