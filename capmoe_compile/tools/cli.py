"""The ``capmoe`` command line: ``capmoe demo``, ``calibrate``, ``sweep``, ``report`` and ``plan``.

Bad input the command can name (an unknown model, a file of the wrong kind, a truncated JSON,
a bad option value, a missing optional dependency) ends in one line on stderr,
``capmoe: error: ...``, and exit code 2; anything else in one line and exit code 1. The
traceback is printed only under ``--debug``. Long steps show a status line on stderr when it is
a terminal (:mod:`capmoe_compile.tools.progress`); ``--quiet`` turns it off.

This module holds the parser and ``main``; each command runs from its own module
(``cli_demo``, ``cli_calibrate``, ``cli_sweep`` for ``sweep`` and ``report``, ``cli_plan``), and
the argument types and checks they share are in ``cli_common``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from capmoe_compile.tools.cli_calibrate import _calibrate
from capmoe_compile.tools.cli_common import MAIN_FAMILIES as MAIN_FAMILIES
from capmoe_compile.tools.cli_common import SHIPPED_MODELS as SHIPPED_MODELS
from capmoe_compile.tools.cli_common import UsageError as UsageError
from capmoe_compile.tools.cli_common import (
    _count,
    _did_you_mean,
    _gamma_list,
    _policy_list,
    _positive_float,
    _positive_int,
)
from capmoe_compile.tools.cli_demo import _demo
from capmoe_compile.tools.cli_sweep import _report, _sweep
from capmoe_compile.tools.progress import Progress

# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (``capmoe: error: ...``, exit code 2) and a "did you
    mean" for a mistyped choice or option. A mistyped option is named before any required one
    it leaves missing (``--traget 1.3`` is an unrecognized ``--traget``, not a missing
    ``--target``)."""

    _given: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        # what this parser (a command's, for its own words) was given, for error()
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._commands().get(getattr(ns, "command", None), self)
            unknown = command._unknown_option(extras, also=self)
            command.error(unknown or f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def _unknown_option(self, words: list[str], also=None) -> str | None:
        """The first of ``words`` that looks like an option neither this parser nor ``also``
        takes (an abbreviation of one counts as taken), with the closest option named."""
        options = [*self._option_string_actions, *(also._option_string_actions if also else ())]
        for word in words:
            if word == "--":
                break
            flag = word.split("=", 1)[0]
            if not flag.startswith("-") or flag == "-" or _NUMBER.match(flag):
                continue
            if flag.startswith("--"):  # --opt, or an abbreviation of one
                if any(o.startswith(flag) for o in options):
                    continue
            elif flag[:2] in options:  # -q, -qv (-q -v) or -n5
                continue
            close = difflib.get_close_matches(flag, [o for o in options if o != "-h"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"unrecognized argument {flag}{hint}"
        return None

    def error(self, message: str) -> NoReturn:
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            message += _did_you_mean(m.group(1), choices)
        elif "required" in message:  # a mistyped option says so, not what it left missing
            message = self._unknown_option(self._given) or message
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
    from capmoe_compile.tools.cli_plan import add_cli as _plan_cli  # capmoe plan (issue 27)

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
