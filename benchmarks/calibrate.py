"""Uniform gamma vs calibrated per-layer capacity, on held-out text (issue 17).

    python -m benchmarks.calibrate --model balanced --out benchmarks/results/calibrate_balanced.json
    python -m benchmarks.calibrate --model tiny --out benchmarks/results/calibrate_tiny.json
    python -m benchmarks.calibrate --plot benchmarks/results/calibrate_pareto.png \\
        --from benchmarks/results/calibrate_tiny.json benchmarks/results/calibrate_balanced.json

The validation files of the shipped corpus (never trained on) are split in two at a file
boundary (``capmoe_compile.models.split_validation``): ``--cal-windows`` windows of the first
part are the calibration batches, ``--windows`` windows of the rest the held-out text that
every figure below is measured on.

1. **Uniform**: one gamma for every layer, for every policy of SPEC.md (perplexity, next-token
   accuracy, pairs dropped / added, modeled EP speedup; ``benchmarks.quality.evaluate_cell``).
2. **Calibrated**: ``capmoe_compile.calibrate`` at each ``--targets`` speedup (the per-layer
   measurements are taken once and reused across targets), then the chosen per-layer setting
   evaluated on the held-out windows the same way.
3. **Verdict** per target: the calibrated setting against every uniform row (any policy) whose
   held-out modeled speedup is at least the calibrated one's: does it have lower perplexity?

The modeled speedup is SPEC.md's, summed over layers and calls (``sum max_load_before /
sum max_load_after``; ``capmoe_compile.calibrate.model_speedup``). No timing is measured; one
CPU thread; deterministic. ``--out`` writes the JSON and the table beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import with_isa
from benchmarks.quality import _progress, evaluate_cell

UNIFORM_GAMMAS: tuple[float, ...] = (
    4.0,
    3.0,
    2.5,
    2.25,
    2.0,
    1.75,
    1.5,
    1.375,
    1.25,
    1.125,
    1.0,
    0.75,
)
#: the policies that never beat ``score`` in the recorded quality table get a coarser grid
COARSE_POLICIES = ("order", "reverse", "random")
COARSE_GAMMAS: tuple[float, ...] = (3.0, 2.0, 1.5, 1.25, 1.0)
TARGETS: tuple[float, ...] = (1.1, 1.2, 1.3, 1.45, 1.6, 1.8, 2.0)


def _load(name: str):
    from capmoe_compile.models import load_balanced_moe, load_tiny_moe

    if name == "tiny":
        return load_tiny_moe()[0]
    if name == "balanced":
        return load_balanced_moe()[0]
    return load_tiny_moe(name)[0]


def run(
    *,
    model_name: str = "balanced",
    batch: int = 8,
    seq: int = 256,
    windows: int = 256,
    cal_windows: int = 32,
    targets: tuple[float, ...] = TARGETS,
    cal_policies: tuple[str, ...] = ("score",),
    gammas: tuple[float, ...] = UNIFORM_GAMMAS,
    coarse_gammas: tuple[float, ...] = COARSE_GAMMAS,
    progress: bool = True,
) -> dict:
    import capmoe_compile as cc
    from capmoe_compile.models import split_validation, stdlib_corpus, validation_windows

    t0 = time.perf_counter()
    model = _load(model_name)
    corpus = stdlib_corpus()
    cal_part, held_part = split_validation(corpus)
    cal = validation_windows(cal_part, seq, cal_windows)
    held = validation_windows(held_part, seq, windows - windows % batch)
    cal_batches = [cal[i : i + batch] for i in range(0, cal.shape[0] - batch + 1, batch)]

    graph = {"kind": None, "fn": None}

    def compiled(kind: str):
        # expanded_drop gives tokens up to E experts: another graph (see benchmarks.quality)
        if graph["kind"] != kind:
            torch._dynamo.reset()
            graph.update(kind=kind, fn=torch.compile(model, backend="capmoe", dynamic=False))
        return graph["fn"]

    def uniform(gamma, policy):
        kind = "expanded" if gamma is not None and policy == "expanded_drop" else "k"
        fn = compiled(kind)

        def call(ids):
            with cc.config.patch(capacity_factor=gamma, policy=policy or "score"):
                with cc.record_stats() as st:
                    logits = fn(ids).logits
            return logits, st.layers

        return evaluate_cell(call, held, batch)

    def configured(calibration):
        fn = compiled("k")

        def call(ids):
            with cc.record_stats() as st:
                logits = fn(ids).logits
            return logits, st.layers

        calibration.apply(model)
        try:
            with cc.config.patch(capacity_factor=None):
                return evaluate_cell(call, held, batch)
        finally:
            calibration.clear(model)

    cells = [(None, None)]
    for policy in cc.POLICIES:
        grid = coarse_gammas if policy in COARSE_POLICIES else gammas
        cells += [(g, policy) for g in grid]
    cells.sort(key=lambda c: c[1] == "expanded_drop")  # one recompile, at the end
    bar = _progress(len(cells) + len(targets), f"calibrate {model_name}") if progress else None

    # calibrated settings first (k-wide graph)
    calibrations, cal_rows, first = [], [], None
    for target in targets:
        try:
            c = cc.calibrate(
                model,
                cal_batches,
                target=target,
                policies=cal_policies,
                compiled=compiled("k"),
                reuse=first,
            )
        except ValueError as e:  # target out of reach
            cal_rows.append({"target": target, "error": str(e)})
            continue
        first = first or c
        res = configured(c)
        calibrations.append(c.to_dict())
        cal_rows.append({"target": target, "layers": c.layers, **_strip(res)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"target {target} ppl={res['perplexity']:.3f}")
    rows = []
    for gamma, policy in cells:
        res = uniform(gamma, policy)
        rows.append({"gamma": gamma, "policy": policy, **_strip(res)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"gamma={gamma} {policy} ppl={res['perplexity']:.3f}")
    if bar is not None:
        bar.close()
    base = rows[0]
    for r in rows + [r for r in cal_rows if "error" not in r]:
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["accuracy_change"] = r["accuracy"] - base["accuracy"]
    verdicts = [_verdict(r, rows[1:]) for r in cal_rows if "error" not in r]
    return {
        "benchmark": "calibrate",
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "tokens_per_call": batch * seq,
        "held_out_windows": int(held.shape[0]),
        "calibration_windows": int(cal.shape[0]),
        "split": "validation files split at a file boundary (models.split_validation, 0.3)",
        "calibration_policies": list(cal_policies),
        "uniform_gammas": list(gammas),
        "coarse_gammas": {"policies": list(COARSE_POLICIES), "gammas": list(coarse_gammas)},
        "calibration_passes_first_target": first.search["forward_passes"] if first else None,
        "calibration_seconds_first_target": first.search["seconds"] if first else None,
        "torch": torch.__version__,
        "loadavg_end": os.getloadavg()[0],
        "seconds": round(time.perf_counter() - t0, 1),
        "uniform": rows,
        "calibrated": cal_rows,
        "verdicts": verdicts,
        "calibrations": calibrations,
    }


def _strip(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "layers"}
    out["layer_speedups"] = {l["name"]: l["modeled_speedup"] for l in res["layers"]}  # noqa: E741
    return out


def _verdict(cal: dict, uniform: list[dict]) -> dict:
    """Uniform rows at least as fast (held out) as the calibrated one: is it better than all?"""
    rivals = [r for r in uniform if r["modeled_speedup"] >= cal["modeled_speedup"] - 1e-12]
    best = min(rivals, key=lambda r: r["perplexity"]) if rivals else None
    front = _interpolated_front(uniform, cal["modeled_speedup"])
    return {
        "target": cal["target"],
        "uniform_front_at_calibrated_speedup_ppl_change": front,
        "calibrated_speedup": cal["modeled_speedup"],
        "calibrated_ppl_change": cal["perplexity_change"],
        "best_uniform_at_least_as_fast": None
        if best is None
        else {
            "gamma": best["gamma"],
            "policy": best["policy"],
            "speedup": best["modeled_speedup"],
            "ppl_change": best["perplexity_change"],
        },
        "calibrated_wins": best is None or cal["perplexity"] < best["perplexity"],
        "ppl_margin": None if best is None else best["perplexity"] / cal["perplexity"] - 1,
    }


def _interpolated_front(uniform: list[dict], speedup: float) -> float | None:
    """The uniform Pareto front's perplexity change at ``speedup``: the front (rows, any
    policy, that no other row beats on both speedup and perplexity) interpolated linearly
    between its points either side. A stricter rival than the nearest grid point, which is
    usually faster and worse."""
    pts = sorted((r["modeled_speedup"], r["perplexity_change"]) for r in uniform)
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] < p[1] for q in pts)]
    for (s0, p0), (s1, p1) in zip(front, front[1:], strict=False):
        if s0 <= speedup <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (speedup - s0) / (s1 - s0)
    return None


def format_table(result: dict) -> str:
    b = result["uniform"][0]
    lines = [
        f"model {result['model']}: {result['held_out_windows']} held-out windows of "
        f"{result['seq']} bytes, {result['tokens_per_call']} tokens per call; off: ppl "
        f"{b['perplexity']:.4f}, acc {b['accuracy']:.2%}, max/mean {b['imbalance_before']:.2f}; "
        f"calibration: {result['calibration_windows']} windows of the other validation files, "
        f"policies {result['calibration_policies']}, "
        f"{result['calibration_passes_first_target']} forward passes "
        f"({result['calibration_seconds_first_target']} s) for the first target, reused after",
        "",
        "calibrated (per layer; held out)",
    ]
    head = (
        f"{'target':>6} {'ppl':>7} {'d ppl':>7} {'acc':>6} {'d acc':>6} {'dropped':>7} "
        f"{'EP speedup':>10}  per-layer gamma"
    )
    lines += [head, "-" * len(head)]
    for r in result["calibrated"]:
        if "error" in r:
            lines.append(f"{r['target']:>6} {r['error']}")
            continue
        gammas = " ".join(
            "off" if o["capacity_factor"] is None else f"{o['capacity_factor']:g}"
            for o in r["layers"].values()
        )
        pols = {o["policy"] for o in r["layers"].values() if o["capacity_factor"] is not None}
        lines.append(
            f"{r['target']:>6} {r['perplexity']:>7.4f} {r['perplexity_change']:>+7.2%} "
            f"{r['accuracy']:>6.2%} {r['accuracy_change'] * 100:>+6.2f} "
            f"{r['dropped_share']:>7.1%} {r['modeled_speedup']:>9.3f}x  {gammas}"
            + (f" ({', '.join(sorted(pols))})" if len(pols) > 1 else "")
        )
    lines += ["", "verdict: calibrated vs the best uniform row (any policy) at least as fast"]
    for v in result["verdicts"]:
        best = v["best_uniform_at_least_as_fast"]
        rival = (
            "no uniform row is as fast"
            if best is None
            else f"best uniform: gamma={best['gamma']} {best['policy']} {best['speedup']:.3f}x "
            f"{best['ppl_change']:+.2%}"
        )
        front = v["uniform_front_at_calibrated_speedup_ppl_change"]
        lines.append(
            f"  target {v['target']}: calibrated {v['calibrated_speedup']:.3f}x "
            f"{v['calibrated_ppl_change']:+.2%}; {rival}; "
            f"{'calibrated lower' if v['calibrated_wins'] else 'UNIFORM LOWER'}"
            + ("" if v["ppl_margin"] is None else f" (by {v['ppl_margin']:.2%} of ppl)")
            + ("" if front is None else f"; uniform front interpolated there: {front:+.2%}")
        )
    lines += ["", "uniform (one gamma for every layer; held out)"]
    head = (
        f"{'gamma':>5} {'policy':<13} {'ppl':>7} {'d ppl':>7} {'acc':>6} {'d acc':>6} "
        f"{'dropped':>7} {'added':>6} {'max/mean':>8} {'EP speedup':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in result["uniform"]:
        gamma = "off" if r["gamma"] is None else f"{r['gamma']:g}"
        lines.append(
            f"{gamma:>5} {r['policy'] or '-':<13} {r['perplexity']:>7.4f} "
            f"{r['perplexity_change']:>+7.2%} {r['accuracy']:>6.2%} "
            f"{r['accuracy_change'] * 100:>+6.2f} {r['dropped_share']:>7.1%} "
            f"{r['added_share']:>6.1%} {r['imbalance_after']:>8.2f} "
            f"{r['modeled_speedup']:>9.3f}x"
        )
    return "\n".join(lines)


def plot(results: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        by_policy: dict[str, list] = {}
        for r in res["uniform"][1:]:
            by_policy.setdefault(r["policy"], []).append(r)
        for policy, rs in by_policy.items():
            rs = sorted(rs, key=lambda r: r["modeled_speedup"])
            ax.plot(
                [r["modeled_speedup"] for r in rs],
                [100 * r["perplexity_change"] for r in rs],
                marker=".",
                lw=1,
                alpha=0.8,
                label=f"uniform {policy}",
            )
        cal = sorted(
            (r for r in res["calibrated"] if "error" not in r), key=lambda r: r["modeled_speedup"]
        )
        ax.plot(
            [r["modeled_speedup"] for r in cal],
            [100 * r["perplexity_change"] for r in cal],
            "k*-",
            ms=10,
            lw=2,
            label="calibrated per layer",
        )
        ax.set_yscale("symlog", linthresh=1)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xlim(1, max(2.6, max((r["modeled_speedup"] for r in cal), default=2) + 0.2))
        ax.set_xlabel("modeled EP speedup of the MoE layers (held out)")
        ax.set_ylabel("perplexity change, % (held out)")
        ax.set_title(f"{res['model']} ({res['tokens_per_call']} tokens per call)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _floats(text: str | None) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",")) if text else ()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="balanced", help="tiny, balanced, or a model directory")
    p.add_argument("--out", help="write the JSON result here (and the table as .txt)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--windows", type=int, default=256, help="held-out windows")
    p.add_argument("--cal-windows", type=int, default=32, help="calibration windows")
    p.add_argument("--targets", help="comma-separated speedup targets")
    p.add_argument("--policies", default="score", help="policies the calibration searches")
    p.add_argument("--gammas", help="uniform gammas (score, reroute, expanded_drop)")
    p.add_argument("--coarse-gammas", help="uniform gammas of order, reverse, random")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", help="write the Pareto plot of --from results here and exit")
    p.add_argument("--from", dest="sources", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.plot:
        plot([json.load(open(f)) for f in args.sources], args.plot)
        print(f"wrote {args.plot}")
        return
    torch.set_num_threads(args.threads)
    result = run(
        model_name=args.model,
        batch=args.batch,
        seq=args.seq,
        windows=args.windows,
        cal_windows=args.cal_windows,
        targets=tuple(float(t) for t in args.targets.split(",")) if args.targets else TARGETS,
        cal_policies=tuple(args.policies.split(",")),
        gammas=_floats(args.gammas) or UNIFORM_GAMMAS,
        coarse_gammas=_floats(args.coarse_gammas) or COARSE_GAMMAS,
    )
    table = format_table(result)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(with_isa(result), f, indent=1)
            f.write("\n")
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write(table + "\n")
    print(json.dumps({k: result[k] for k in ("model", "verdicts", "seconds")}))


if __name__ == "__main__":
    main()
