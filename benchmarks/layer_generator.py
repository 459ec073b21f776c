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
to ``--out`` (default ``benchmarks/results/layer_generator.json``) and a summary beside it
(``.md``: command, commit, counts, seconds per layer, load average). Wrong must be 0. Work goes
in chunks of ``--chunk`` cases interleaved across seeds, and both files are rewritten after
each chunk: a run stopped early is recorded (``"complete": false``) and covers every seed
alike; ``--resume`` keeps what ``--out`` holds and checks the rest.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
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


def _run_chunk(args: tuple[tuple[int, ...], int, int, int]) -> list[dict]:
    import torch

    from capmoe_compile.testing import generator as G

    indices, seed, inductor_every, model_every = args
    torch.set_num_threads(1)
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    every = G.cases(max(indices) + 1, seed=seed, model_every=model_every)
    for i in indices:
        case = every[i]
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
            index=i,
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


def _chunks(args, done: set[tuple[int, int]]) -> list[tuple[tuple[int, ...], int, int, int]]:
    """Every seed's cases not ``done`` ((seed, index) pairs), in chunks of ``--chunk``,
    interleaved across seeds (seed 0's first chunk, seed 1's, seed 2's, then the second
    chunks...): a run stopped early has covered every seed alike, and what it covered is
    already written."""
    per_seed = []
    for seed in args.seeds:
        todo = [i for i in range(args.n) if (seed, i) not in done]
        per_seed.append(
            [
                (tuple(todo[j : j + args.chunk]), seed, args.inductor_every, args.model_every)
                for j in range(0, len(todo), args.chunk)
            ]
        )
    return [c for rnd in itertools.zip_longest(*per_seed) for c in rnd if c is not None]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="cases per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--chunk", type=int, default=10, help="cases per unit of work (results written after each)"
    )
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
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the layers --out already holds (same seeds and settings) and check the rest",
    )
    ap.add_argument(
        "--md", default=None, help="a markdown summary beside --out (default: same name, .md)"
    )
    args = ap.parse_args(argv)
    args.chunk = max(1, args.chunk)
    command = "python -m benchmarks.layer_generator " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    t0 = time.perf_counter()
    mach = machine()
    all_rows: list[dict] = []
    if args.resume and Path(args.out).exists():
        prev = json.loads(Path(args.out).read_text())
        same = (
            prev["summary"].get("inductor_every") == args.inductor_every
            and prev["summary"].get("model_every") == args.model_every
        )
        if not same:
            raise SystemExit(f"--resume: {args.out} was run with other --*-every settings")
        all_rows = [r for r in prev["layers"] if "index" in r and r["seed"] in args.seeds]
        mach["resumed_from"] = {
            "rows": len(all_rows),
            "commit": prev["summary"].get("commit"),
            "seconds": prev["summary"].get("seconds"),
            "date": prev["summary"].get("machine", {}).get("date"),
        }
        t0 -= prev["summary"].get("seconds") or 0.0  # wall time counts both runs
        print(f"resuming: {len(all_rows)} layers already checked in {args.out}", flush=True)
    chunks = _chunks(args, {(r["seed"], r["index"]) for r in all_rows})
    if args.jobs > 1:
        pool = mp.get_context("spawn").Pool(args.jobs)
        results = pool.imap(_run_chunk, chunks)
    else:
        pool, results = None, map(_run_chunk, chunks)
    try:
        for rows in results:
            all_rows += rows
            _write(args, command, mach, t0, all_rows, done=False)
    finally:
        if pool is not None:
            pool.terminate()
    total = _write(args, command, mach, t0, all_rows, done=True)
    for seed, s in total["per_seed"].items():
        print(
            f"\nseed {seed}: layers generated {s['generated']} / matched {s['matched']} / "
            f"refused {s['refused']} / wrong {s['wrong']} / both_failed {s['both_failed']}",
            flush=True,
        )
    for r in all_rows:
        if r["verdict"] == "wrong":
            print(f"  WRONG {r['layer']} ({r['inductor']}): {r['wrong']}")
    print("refusal reasons:")
    for reason, n in _reasons(all_rows).most_common():
        print(f"  {n:5d}  {reason}")
    print(json.dumps({k: v for k, v in total["summary"].items() if k != "machine"}))
    return total["summary"]


def _reasons(rows: list[dict]) -> collections.Counter:
    return collections.Counter(r["reason"].split(":")[0] for r in rows if r["verdict"] == "refused")


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def _write(args, command, mach, t0, rows, done: bool) -> dict:
    seconds = round(time.perf_counter() - t0, 1)
    per_seed = {
        seed: _summary([r for r in rows if r["seed"] == seed])
        for seed in args.seeds
        if any(r["seed"] == seed for r in rows)
    }
    summary = {
        **_summary(rows),
        "seeds": list(args.seeds),
        "n_per_seed": args.n,
        "planned": args.n * len(args.seeds),
        "inductor_every": args.inductor_every,
        "model_every": args.model_every,
        "jobs": args.jobs,
        "complete": done and len(rows) == args.n * len(args.seeds),
        "seconds": seconds,
        "seconds_per_layer_wall": round(seconds / max(len(rows), 1), 2),
        "loadavg_now": _load(),
        "commit": mach.setdefault("commit", _commit()),
        "command": command,
        "machine": mach,
    }
    out = {"summary": summary, "per_seed": per_seed, "layers": rows}
    if mach.get("isa") is not None:
        out["isa"] = mach["isa"]  # taken at the start of the run
    out = with_isa(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
    md.write_text(_markdown(out, rows))
    return out


def _markdown(out: dict, rows: list[dict]) -> str:
    s = out["summary"]
    m = s["machine"]
    lines = [
        "# layer_generator run" + ("" if s["complete"] else " (partial: still running or stopped)"),
        "",
        f"- command: `{s['command']}`",
        f"- commit: `{s['commit']}`; started {m.get('date')}",
        f"- seeds {s['seeds']}, {s['n_per_seed']} per seed planned ({s['planned']} in all); "
        f"**{s['generated']} generated** so far",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}; "
        f"load average at start {m.get('loadavg_start')}, at this write {s['loadavg_now']} "
        f"(shared with other jobs); {s['jobs']} process(es)",
        f"- wall time {s['seconds']} s, {s['seconds_per_layer_wall']} s per layer (wall)",
        "",
        "| | generated | matched | refused | wrong | both_failed | forbidden_match |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in [*((f"seed {k}", v) for k, v in out["per_seed"].items()), ("all", s)]:
        lines.append(
            f"| {name} | {t['generated']} | {t['matched']} | {t['refused']} | {t['wrong']} | "
            f"{t['both_failed']} | {t['forbidden_match']} |"
        )
    lines += ["", "Seconds per case, by reference backend:", ""]
    for mode, t in s["seconds_per_case"].items():
        lines.append(
            f"- {mode}: n={t['n']}, mean {t['mean']}, median {t['median']}, max {t['max']}"
        )
    lines += ["", "By issue-23 feature (verdict counts):", ""]
    for k, v in s["by_feature"].items():
        lines.append(f"- {k}: {v}")
    wrong = [r for r in rows if r["verdict"] == "wrong"]
    lines += ["", f"Wrong ({len(wrong)}):", ""]
    lines += [f"- `{r['layer']}` ({r['inductor']}): {r['wrong']}" for r in wrong] or ["- none"]
    failed = [r for r in rows if r["verdict"] == "both_failed"]
    lines += ["", f"Both failed (capmoe and the reference; not wrong) ({len(failed)}):", ""]
    lines += [f"- `{r['layer']}`: {r.get('reference_failed', '')}" for r in failed] or ["- none"]
    lines += ["", "Refusal reasons (first clause):", ""]
    lines += [f"- {n}: {reason}" for reason, n in _reasons(rows).most_common()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
