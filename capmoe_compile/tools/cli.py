"""The ``capmoe`` command line: ``capmoe demo``, ``calibrate``, ``sweep`` and ``report``.

Bad input the command can name (an unknown model, a file of the wrong kind, a truncated JSON,
a bad option value, a missing optional dependency) ends in one line on stderr,
``capmoe: error: ...``, and exit code 2; anything else in one line and exit code 1. The
traceback is printed only under ``--debug``. Long steps show a status line on stderr when it is
a terminal (:mod:`capmoe_compile.tools.progress`); ``--quiet`` turns it off.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from capmoe_compile.tools.progress import Progress

#: The models shipped in the wheel, by the names the commands take.
SHIPPED_MODELS = ("tiny", "balanced")
#: Zoo families the demo is measured on first (``capmoe_compile.testing.zoo.MAIN_FAMILIES``).
MAIN_FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3")


class UsageError(Exception):
    """Bad input the command can name: one line ``capmoe: error: <message>``, exit code 2."""


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _missing(extra: str, what: str, err: ModuleNotFoundError) -> UsageError:
    return UsageError(
        f"{what} needs {err.name}, which is not installed: pip install 'capmoe-compile[{extra}]'"
    )


# ---------------------------------------------------------------------------------------------
# argument types: each names what it wants, with a suggestion
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _policy_list(text: str) -> tuple[str, ...]:
    from capmoe_compile.routing import policy_names

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one policy")
    for p in names:
        if p not in policy_names():
            raise argparse.ArgumentTypeError(
                f"unknown policy {p!r}{_did_you_mean(p, policy_names())} "
                f"(choose from {', '.join(policy_names())})"
            )
    return names


def _gamma_list(text: str) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for g in (g.strip() for g in text.split(",") if g.strip()):
        out.append(None if g == "off" else _positive_float(g))
    if not out:
        raise argparse.ArgumentTypeError("give at least one gamma (a number > 0, or off)")
    return tuple(out)


def _model_dir(name: str) -> Path:
    """``tiny``, ``balanced`` (the shipped models) or a model directory, checked."""
    from capmoe_compile.models import BALANCED_MOE_DIR, TINY_MOE_DIR

    shipped = {"tiny": TINY_MOE_DIR, "balanced": BALANCED_MOE_DIR}
    if name in shipped:
        return shipped[name]
    path = Path(name)
    if not path.exists():
        raise UsageError(
            f"--model {name!r} is neither a shipped model nor a directory: give `tiny`, "
            f"`balanced` or a model directory{_did_you_mean(name, SHIPPED_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {name!r} is not a model directory (no config.json in it): give `tiny`, "
            "`balanced` or a directory saved by transformers' save_pretrained"
        )
    return path


def _load_model(name: str):
    from capmoe_compile.models import load_tiny_moe

    path = _model_dir(name)
    try:
        return load_tiny_moe(path)[0]
    except ModuleNotFoundError as e:
        if e.name in ("transformers", "safetensors"):
            raise _missing("models", "loading a model", e) from e
        raise


def _check_out(path: str | None) -> None:
    """Fail before the work, not after it, where ``--out`` cannot be written."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, progress: Progress) -> int:
    echo = progress.echo
    if args.model == "zoo":
        try:
            from capmoe_compile.testing import zoo
        except ModuleNotFoundError as e:
            raise _missing("models", "capmoe demo --model zoo", e) from e
        if args.family not in zoo.FAMILIES:
            raise UsageError(
                f"--family {args.family!r} is not a zoo family"
                f"{_did_you_mean(args.family, zoo.FAMILIES)} "
                f"(choose from {', '.join(zoo.FAMILIES)})"
            )
    import torch

    import capmoe_compile as cc

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.model == "shipped":
        from capmoe_compile.models import stdlib_corpus, validation_windows

        echo(
            "capmoe demo: the shipped tiny MoE LM (Mixtral config, E=8, k=2, trained without a "
            "balancing loss) on held-out Python standard library text, "
            f"batch {args.batch} x {args.seq} bytes, gamma={args.gamma}, policy={args.policy}"
        )
        progress.phase("loading the shipped model and its held-out text")
        model = _load_model("tiny")
        ids = validation_windows(stdlib_corpus(), args.seq, args.batch)
    else:
        echo(
            f"capmoe demo: tiny {args.family} (random weights, router skewed like trained "
            f"ones), batch {args.batch} x {args.seq} tokens, gamma={args.gamma}, "
            f"policy={args.policy}"
        )
        progress.phase(f"building a random-weight {args.family}")
        model = zoo.build(args.family, seed=args.seed, skew=args.skew)
        ids = zoo.random_input_ids(model, args.batch, args.seq, seed=args.seed)

    # one forward over whole windows: no KV cache wanted (the shipped config enables it for
    # generate)
    call = {"use_cache": False}
    progress.phase("explain: tracing the model with the capmoe passes")
    report = cc.explain(model, capacity_factor=args.gamma, policy=args.policy)(ids, **call)
    echo(report)

    compiled = torch.compile(model, backend="capmoe", dynamic=False)
    with torch.no_grad():
        progress.phase("eager run")
        eager = model(ids, **call).logits
        progress.phase("compile (Inductor) and the capacity-off run")
        with cc.config.patch(capacity_factor=None):
            off = compiled(ids, **call).logits
        err = (off - eager).abs().max().item()
        agree = torch.allclose(off, eager, atol=1e-4, rtol=1e-4)
        progress.phase(f"capacity-on run (gamma={args.gamma}, policy={args.policy})")
        with cc.config.patch(capacity_factor=args.gamma, policy=args.policy):
            with cc.record_stats() as stats:
                on = compiled(ids, **call).logits
    echo(f"\ncapacity off: compiled == eager: {agree} (max |diff| {err:.2e})")
    loss_off, loss_on = _next_token_loss(off, ids), _next_token_loss(on, ids)
    text = "held-out text" if args.model == "shipped" else "random tokens, random weights"
    echo(
        f"\nthe cost: next-token loss on the {text}: off {loss_off:.4f} "
        f"(perplexity {math.exp(loss_off):.3f}), gamma={args.gamma} {args.policy} "
        f"{loss_on:.4f} (perplexity {math.exp(loss_on):.3f}, "
        f"{math.exp(loss_on - loss_off) - 1:+.1%})"
    )
    echo(f"\ngamma={args.gamma}, policy={args.policy}, per layer:")
    head = f"{'layer':<22} {'T':>5} {'C':>5} {'max/mean before':>16} {'after':>6} {'dropped':>8} {'added':>6} {'EP speedup':>11}"
    echo(head)
    for s in stats.layers:
        echo(
            f"{s.name:<22} {s.tokens:>5} {s.capacity if s.capacity is not None else '-':>5} "
            f"{s.imbalance_before:>16.2f} {s.imbalance_after:>6.2f} {s.dropped:>8} {s.added:>6} "
            f"{s.modeled_speedup:>10.2f}x"
        )
    echo(
        "\nbefore / after: max/mean expert load of the pairs the model selected / of the pairs "
        "computed under capacity (the busiest expert's share, 1.00 = perfectly balanced)"
    )
    echo(
        "EP speedup: max_load_before / max_load_after, how much sooner the busiest expert "
        "(which sets the layer's time under expert parallelism) finishes, modeled at equal "
        "per-token cost, not measured"
    )
    echo(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if agree else 1


def _next_token_loss(logits, ids) -> float:
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    ).item()


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

    from capmoe_compile.tools import sweep

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
    progress.phase(f"loading {args.model}")
    model = _load_model(args.model)
    cal_part, held_part = split_validation(stdlib_corpus())

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


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (``capmoe: error: ...``, exit code 2) and a "did you
    mean" for a mistyped choice."""

    def error(self, message: str) -> NoReturn:
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            message += _did_you_mean(m.group(1), choices)
        self.exit(2, f"capmoe: error: {message} (see: {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--debug`` and ``--quiet``, accepted before and after the command name."""
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="on an error, print the full traceback instead of one line",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress line on stderr (it is shown only when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    from capmoe_compile.routing import policy_names

    policies = policy_names()
    parser = _Parser(
        prog="capmoe",
        description="capmoe-compile: capacity-aware MoE inference as a torch.compile backend",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p, top=False)
        p.set_defaults(func=func)
        return p

    demo = command("demo", "run a tiny skewed MoE model eager, explained and compiled", _demo)
    demo.add_argument(
        "--model",
        choices=("shipped", "zoo"),
        default="shipped",
        help="shipped: the trained tiny MoE LM (real skew); zoo: a random-weight --family model "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--family",
        default="mixtral",
        help="zoo family, with --model zoo: one of capmoe_compile.testing.zoo.FAMILIES, e.g. "
        f"{', '.join(MAIN_FAMILIES)} (a wrong name lists them all; default: %(default)s)",
    )
    demo.add_argument(
        "--gamma",
        type=_positive_float,
        default=1.0,
        help="capacity factor gamma: C = ceil(gamma * T * k / E) (default: %(default)s)",
    )
    demo.add_argument(
        "--policy",
        choices=policies,
        default="score",
        help="which pairs survive when an expert overflows (SPEC.md; default: %(default)s)",
    )
    demo.add_argument(
        "--batch", type=_positive_int, default=4, help="sequences per call (default: %(default)s)"
    )
    demo.add_argument(
        "--seq",
        type=_positive_int,
        default=64,
        help="tokens (bytes, for the shipped model) per sequence (default: %(default)s)",
    )
    demo.add_argument(
        "--skew",
        type=float,
        default=1.5,
        help="router skew of the random-weight zoo model, with --model zoo (default: %(default)s)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="torch seed and zoo weights seed (default: %(default)s)"
    )

    cal = command(
        "calibrate",
        "per-layer capacity factors for a target modeled EP speedup or a perplexity budget",
        _calibrate,
    )
    cal.add_argument(
        "--model",
        default="balanced",
        help="tiny, balanced (the shipped models) or a model directory (default: %(default)s)",
    )
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument(
        "--target", type=_positive_float, help="modeled EP speedup to reach, e.g. 1.3"
    )
    goal.add_argument(
        "--max-ppl-increase",
        type=_positive_float,
        help="perplexity budget, e.g. 0.01 for +1%%: the largest speedup within it",
    )
    cal.add_argument(
        "--policies",
        type=_policy_list,
        default=("score",),
        metavar="P[,P...]",
        help=f"comma-separated policies to search, of: {', '.join(policies)} (default: score)",
    )
    cal.add_argument(
        "--windows",
        type=_positive_int,
        default=32,
        help="calibration windows of --seq bytes (default: %(default)s)",
    )
    cal.add_argument(
        "--held-out",
        type=_count,
        default=256,
        help="held-out windows to measure the result on, 0: none (default: %(default)s)",
    )
    cal.add_argument(
        "--batch", type=_positive_int, default=8, help="windows per call (default: %(default)s)"
    )
    cal.add_argument(
        "--seq", type=_positive_int, default=256, help="bytes per window (default: %(default)s)"
    )
    cal.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: %(default)s, the figures' setting)",
    )
    cal.add_argument(
        "--out", metavar="FILE", help="save the calibration JSON here (Calibration.load reads it)"
    )
    cal.add_argument(
        "-v", "--verbose", action="store_true", help="print every search pass to stdout"
    )

    sw = command(
        "sweep",
        "perplexity and modeled EP speedup over gammas x policies (the JSON capmoe report plots)",
        _sweep,
    )
    sw.add_argument(
        "--out", metavar="FILE", help="write the sweep's JSON here (and the table beside it, .txt)"
    )
    sw.add_argument(
        "--model",
        default="tiny",
        help="tiny, balanced (the shipped models) or a model directory (default: %(default)s)",
    )
    sw.add_argument(
        "--gammas",
        type=_gamma_list,
        default=(None, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5),
        metavar="G[,G...]",
        help="comma-separated gammas, `off` for capacity off (always run) "
        "(default: off,2,1.5,1.25,1,0.75,0.5)",
    )
    sw.add_argument(
        "--policies",
        type=_policy_list,
        default=None,
        metavar="P[,P...]",
        help=f"comma-separated policies, of: {', '.join(policies)} (default: all)",
    )
    sw.add_argument(
        "--windows",
        type=_positive_int,
        default=64,
        help="held-out windows of --seq bytes, at most 2027 at seq 256 (default: %(default)s; "
        "benchmarks/quality.py uses 512)",
    )
    sw.add_argument(
        "--batch", type=_positive_int, default=8, help="windows per call (default: %(default)s)"
    )
    sw.add_argument(
        "--seq", type=_positive_int, default=256, help="bytes per window (default: %(default)s)"
    )
    sw.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads (default: %(default)s)"
    )

    report = command(
        "report",
        "PNG plots of a quality sweep (the JSON of capmoe sweep --out); needs matplotlib",
        _report,
    )
    report.add_argument(
        "--results",
        required=True,
        metavar="FILE",
        help="a quality sweep's JSON: capmoe sweep --out FILE (or benchmarks/quality.py --out)",
    )
    report.add_argument(
        "--out-dir", default=".", help="where the PNGs go, created if missing (default: here)"
    )
    report.add_argument(
        "--gamma",
        type=_positive_float,
        default=1.0,
        help="gamma of the load profiles; one of the sweep's (default: %(default)s)",
    )
    from capmoe_compile.plan import add_cli as _plan_cli  # capmoe plan (issue 27)

    _plan_cli(sub)
    for p in sub.choices.values():  # commands added elsewhere get --debug and --quiet too
        if "--debug" not in p._option_string_actions:
            _common(p, top=False)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    # transformers' "Loading weights" bar would write past --quiet and into piped stderr; the
    # status line says "loading" instead (read when transformers is first imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(args.command, enabled=False if args.quiet else None)
    try:
        with progress, progress.follow():  # the compile's steps after the phase, on a terminal
            return args.func(args, progress)
    except UsageError as e:
        if args.debug:
            raise
        parser.exit(2, f"capmoe: error: {_one_line(e)}\n")
    except (ValueError, FileNotFoundError) as e:  # the library's own checks of what it was given
        if args.debug:
            raise
        parser.exit(2, f"capmoe: error: {_one_line(e)}\n")
    except KeyboardInterrupt:
        parser.exit(130, "capmoe: interrupted\n")
    except Exception as e:
        if args.debug:
            raise
        parser.exit(
            1,
            f"capmoe: error: {type(e).__name__}: {_one_line(e)} "
            f"(rerun with --debug for the traceback)\n",
        )


if __name__ == "__main__":
    sys.exit(main())
