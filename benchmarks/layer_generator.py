"""Differential check of thousands of generated MoE layers (``capmoe_compile.testing.generator``).

For every case (a layer, or every ``--model-every``-th a bf16 model of 2-3 layers): the model
is compiled by a reference backend and by ``backend="capmoe"``; capacity off must equal eager;
then, on the same compiled model, configuration switches between calls (every policy by
``config.patch``, capacity off again, ``expanded_drop``, ``renormalize``, ``configure`` /
``exempt`` of a layer, ``options=``) must each follow the new configuration (the SPEC oracle
built on ``capmoe_compile.route`` where capmoe rewrote a layer SPEC lets it rewrite, eager
elsewhere) and never raise. A capmoe failure where the reference compiles is wrong; where the
reference fails too it is ``both_failed`` (reported apart, not wrong).

What "compiles under Inductor" means here: Inductor's CPU code generation costs seconds per
graph (2-30 s per case measured, one core), so every ``--inductor-every``-th case runs with
``backend="inductor"`` as the reference and capmoe's own inner compiler (Inductor), and is held
to issue 23's bar (capacity off within max(2 x Inductor's own max |diff| from eager, 1e-5)).
Every other case uses Dynamo's default capture + AOTAutograd + eager as the reference
(``backend="aot_eager"``: what decides whether the model traces and functionalises, without code
generation) and ``backend="capmoe"`` with AOT eager in place of ``compile_fx``, held to the
dtype's tolerance (the reference's own diff is ~0 there, so the 2x bar would measure nothing).

    python -m benchmarks.layer_generator --seeds 0 1 2 --n 1000
    python -m benchmarks.layer_generator --n 50 --inductor-every 1   # all through Inductor

Prints per seed "generated / matched / refused / wrong / both_failed" and writes every outcome
to ``--out`` (default ``benchmarks/results/layer_generator.json``). Wrong must be 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from .common import machine, with_isa

RESULTS = Path(__file__).parent / "results"


def _kind(case) -> list[str]:
    """The issue-23 features a case exercises (for the per-feature counts)."""
    from capmoe_compile.testing import generator as G

    if isinstance(case, G.ModelSpec):
        out = ["bf16_multilayer"]
        layers = case.layers
    else:
        out, layers = [], [case]
    for s in layers:
        if s.router_cap:
            out.append(f"router_cap.{s.cap}")
        if s.dispatch.startswith("split_"):
            out.append("split_tolist")
    return sorted(set(out)) or ["other"]


def _run_chunk(args: tuple[int, int, int, int, int]) -> list[dict]:
    import torch

    from capmoe_compile.testing import generator as G

    start, stop, seed, inductor_every, model_every = args
    torch.set_num_threads(1)
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    for i, case in enumerate(G.cases(stop, seed=seed, model_every=model_every)[start:stop], start):
        full = bool(inductor_every) and i % inductor_every == 3 % inductor_every
        t = time.perf_counter()
        try:
            o = G.check(case, inductor=full)
            row = {
                "verdict": o.verdict,
                "reason": o.reason,
                "wrong": o.wrong,
                "reference_failed": o.reference_failed,
                "forbidden_match": o.forbidden_match,
                "off_diff": o.off_diff,
                "reference_diff": o.reference_diff,
                "steps": o.steps,
            }
        except Exception as e:  # a crash of the check itself is reported as wrong
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            row = {"verdict": "wrong", "reason": "", "wrong": f"check raised: {tb[:400]}"}
        row.update(
            layer=case.ident,
            expected_match=case.expected_match,
            inductor="inductor" if full else "aot_eager",
            kinds=_kind(case),
            seed=seed,
        )
        row["seconds"] = round(time.perf_counter() - t, 3)
        rows.append(row)
        print(
            f"{row['verdict']:>11} {row['seconds']:6.2f}s {row['inductor']:9} {case.ident}",
            flush=True,
        )
    return rows


def _summary(rows: list[dict]) -> dict:
    counts = collections.Counter(r["verdict"] for r in rows)
    by_mode = collections.defaultdict(list)
    for r in rows:
        by_mode[r["inductor"]].append(r["seconds"])
    kinds = collections.defaultdict(collections.Counter)
    for r in rows:
        for k in r["kinds"]:
            kinds[k][r["verdict"]] += 1
    return {
        "generated": len(rows),
        "matched": counts["matched"],
        "refused": counts["refused"],
        "wrong": counts["wrong"],
        "both_failed": counts["both_failed"],
        "forbidden_match": sum(bool(r.get("forbidden_match")) for r in rows),
        "refused_but_rewritable": sum(
            r["verdict"] == "refused" and r["expected_match"] for r in rows
        ),
        "by_feature": {k: dict(v) for k, v in sorted(kinds.items())},
        "seconds_per_case": {
            mode: {
                "n": len(s),
                "mean": round(statistics.mean(s), 2),
                "median": round(statistics.median(s), 2),
                "max": round(max(s), 2),
            }
            for mode, s in sorted(by_mode.items())
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="cases per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--inductor-every",
        type=int,
        default=50,
        help="every this many cases run through full Inductor (0: none)",
    )
    ap.add_argument(
        "--model-every",
        type=int,
        default=50,
        help="every this many cases is a bf16 multi-layer model (0: none)",
    )
    ap.add_argument("--out", default=str(RESULTS / "layer_generator.json"))
    args = ap.parse_args(argv)
    command = "python -m benchmarks.layer_generator " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    t0 = time.perf_counter()
    mach = machine()
    step = max(1, min(50, args.n // max(args.jobs, 1)))
    all_rows, per_seed = [], {}
    for seed in args.seeds:
        t_seed = time.perf_counter()
        chunks = [
            (i, min(i + step, args.n), seed, args.inductor_every, args.model_every)
            for i in range(0, args.n, step)
        ]
        if args.jobs > 1:
            with mp.get_context("spawn").Pool(args.jobs) as pool:
                rows = [r for chunk in pool.imap(_run_chunk, chunks) for r in chunk]
        else:
            rows = [r for c in chunks for r in _run_chunk(c)]
        per_seed[seed] = {**_summary(rows), "seconds": round(time.perf_counter() - t_seed, 1)}
        s = per_seed[seed]
        print(
            f"\nseed {seed}: layers generated {s['generated']} / matched {s['matched']} / "
            f"refused {s['refused']} / wrong {s['wrong']} / both_failed {s['both_failed']}  "
            f"({s['seconds']} s)",
            flush=True,
        )
        all_rows += rows
        _write(args, command, mach, t0, per_seed, all_rows, done=False)
    total = _write(args, command, mach, t0, per_seed, all_rows, done=True)
    for r in all_rows:
        if r["verdict"] == "wrong":
            print(f"  WRONG {r['layer']} ({r['inductor']}): {r['wrong']}")
    reasons = collections.Counter(
        r["reason"].split(":")[0] for r in all_rows if r["verdict"] == "refused"
    )
    print("refusal reasons:")
    for reason, n in reasons.most_common():
        print(f"  {n:5d}  {reason}")
    print(json.dumps(total["summary"]))
    return total["summary"]


def _write(args, command, mach, t0, per_seed, rows, done: bool) -> dict:
    summary = {
        **_summary(rows),
        "seeds": list(per_seed),
        "n_per_seed": args.n,
        "inductor_every": args.inductor_every,
        "model_every": args.model_every,
        "complete": done,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": command,
        "machine": mach,
    }
    out = with_isa({"summary": summary, "per_seed": per_seed, "layers": rows})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
