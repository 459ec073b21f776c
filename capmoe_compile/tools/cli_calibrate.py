"""``capmoe calibrate``: per-layer capacity factors for a target speedup or a perplexity
budget, on the shipped corpus, with a held-out check."""

from __future__ import annotations

import argparse
import time

from capmoe_compile.tools.cli_common import (
    UsageError,
    _check_out,
    _check_windows,
    _load_model,
    _model_dir,
)
from capmoe_compile.tools.progress import Progress


def _calibrate(args: argparse.Namespace, progress: Progress) -> int:
    _check_out(args.out)
    if args.windows < args.batch:
        raise UsageError(f"--windows {args.windows} is fewer than one --batch ({args.batch})")
    if 0 < args.held_out < args.batch:
        raise UsageError(f"--held-out {args.held_out} is fewer than one --batch ({args.batch})")
    _model_dir(args.model)  # a bad name fails before anything is imported
    import torch

    import capmoe_compile as cc
    from capmoe_compile.models import split_validation, stdlib_corpus, validation_windows

    torch.set_num_threads(args.threads)
    cal_part, held_part = split_validation(stdlib_corpus())
    _check_windows("--windows", args.windows, args.seq, cal_part, "the calibration text")
    _check_windows("--held-out", args.held_out, args.seq, held_part, "the held-out text")
    progress.phase(f"loading {args.model}")
    model = _load_model(args.model)

    def batches(part, n):
        w = validation_windows(part, args.seq, n - n % args.batch)
        return [w[i : i + args.batch] for i in range(0, w.shape[0], args.batch)]

    cal_batches = batches(cal_part, args.windows)
    held_batches = batches(held_part, args.held_out) if args.held_out else []
    passes = 0
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        nonlocal passes
        if args.verbose:
            progress.echo(f"[calibrate {time.perf_counter() - t0:6.1f} s] {msg}")
        if not msg.startswith("baseline pass"):
            passes += 1
        progress.phase(f"search pass {passes + 1} ({len(cal_batches)} batches each); last: {msg}")

    progress.phase("compiling the model (the baseline pass)")
    compiled = torch.compile(model, backend="capmoe", dynamic=False)
    cal = cc.calibrate(
        model,
        cal_batches,
        target=args.target,
        max_ppl_increase=args.max_ppl_increase,
        policies=args.policies,
        compiled=compiled,
        progress=step,
    )
    progress.echo(cal)
    progress.echo(
        f"search: {cal.search['forward_passes']} forward passes of {len(cal.search['rounds'])} "
        f"check round(s), {cal.search['seconds']:.1f} s"
    )
    if held_batches:
        progress.phase(f"held-out evaluation ({args.held_out} windows)")
        res = cal.evaluate(
            model,
            held_batches,
            compiled=compiled,
            progress=lambda m: progress.phase(
                f"held-out evaluation ({args.held_out} windows), {m}"
            ),
        )
        progress.echo(
            f"held out ({args.held_out} windows of other files): perplexity "
            f"{res['ppl_change']:+.2%}, modeled EP speedup {res['speedup']:.3f}x"
        )
    if args.out:
        progress.echo(f"wrote {cal.save(args.out)}")
    return 0
