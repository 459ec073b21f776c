"""``capmoe sweep`` (perplexity and modeled EP speedup over gammas x policies) and
``capmoe report`` (the PNG plots of a sweep's JSON, checked to be one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capmoe_compile.tools.cli_common import (
    SHIPPED_MODELS,
    UsageError,
    _check_out,
    _check_windows,
    _missing,
    _model_dir,
)
from capmoe_compile.tools.progress import Progress


def _read_json(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise UsageError(f"--results {path} {what}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno} (character {e.pos} of {len(e.doc)})"
        if not e.doc[e.pos :].strip():
            where += ", where the file ends: it is truncated"
        raise UsageError(f"{path} is not valid JSON: {e.msg} at {where}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not a JSON text file ({e.reason} at byte {e.start})") from e


_SWEEP_HOW = "`capmoe sweep --out FILE` (or python -m benchmarks.quality --out FILE)"


def _kind(data: Any) -> str:
    """What a results JSON is, in words, for the error that says it is the wrong one."""
    if isinstance(data, dict):
        if "layers" in data and "search" in data:
            return "a calibration (capmoe calibrate --out)"
        if "benchmark" in data:
            return f"a {data['benchmark']!r} benchmark record"
        return f"a JSON object with keys {', '.join(map(repr, list(data)[:6]))}"
    return f"a JSON {type(data).__name__}"


def _check_sweep(path: str, data: Any) -> dict:
    """``data`` if it is a quality sweep (what report plots), else a one-line UsageError."""
    rows = data.get("rows") if isinstance(data, dict) else None
    cell = ("gamma", "policy", "perplexity", "modeled_speedup", "layers")
    ok = (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, dict) and all(k in r for k in cell) for r in rows)
    )
    if not ok or data.get("benchmark", "quality") != "quality":
        raise UsageError(
            f"{path} is {_kind(data)}, not a quality sweep: capmoe report plots the JSON of "
            f"{_SWEEP_HOW}"
        )
    if not any(r["gamma"] is None and r["policy"] is None for r in rows):
        raise UsageError(f"{path} has no capacity-off row; run the sweep with gamma `off`")
    return data


def _report(args: argparse.Namespace, progress: Progress) -> int:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        raise _missing("report", "capmoe report (it draws PNGs)", e) from e
    from capmoe_compile.tools.report import write_report

    data = _check_sweep(args.results, _read_json(args.results))
    gammas = sorted({r["gamma"] for r in data["rows"] if r["gamma"] is not None}, reverse=True)
    if args.gamma not in gammas:
        listed = ", ".join(f"{g:g}" for g in gammas) or "none"
        raise UsageError(f"--gamma {args.gamma:g} is not a gamma of {args.results} ({listed})")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file")
    progress.phase("drawing")
    for name, (path, _) in write_report(data, out, gamma=args.gamma).items():
        progress.echo(f"{name}: {path}")
    return 0


def _sweep(args: argparse.Namespace, progress: Progress) -> int:
    _check_out(args.out)
    model = _model_dir(args.model)
    import torch

    from capmoe_compile.models import stdlib_corpus
    from capmoe_compile.tools import sweep

    _check_windows("--windows", args.windows, args.seq, stdlib_corpus(), "the validation text")
    torch.set_num_threads(args.threads)

    def step(done: int, total: int, text: str) -> None:
        progress.phase(f"cell {done + 1 if done < total else done}/{total}; last: {text}")

    progress.phase("loading the model and compiling it (the first cell)")
    try:
        result = sweep.run(
            batch=args.batch,
            seq=args.seq,
            windows=args.windows,
            policies=args.policies,
            gammas=args.gammas,
            model_path=args.model if args.model in SHIPPED_MODELS else str(model),
            progress=step,
        )
    except ModuleNotFoundError as e:
        if e.name in ("transformers", "safetensors"):
            raise _missing("models", "capmoe sweep", e) from e
        raise
    progress.echo("\n" + sweep.describe(result) + "\n")
    progress.echo(sweep.format_table(result))
    progress.echo("\n" + sweep.LEGEND)
    if args.out:
        progress.echo(f"wrote {sweep.save(result, args.out)} (plot it: capmoe report --results)")
    return 0
