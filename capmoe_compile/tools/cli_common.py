"""What the ``capmoe`` commands share: the shipped model names, the one-line usage error,
the argument types (each names what it wants, with a suggestion) and the model and ``--out``
checks."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Sequence
from pathlib import Path

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


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _count(text: str) -> int:
    return _int_at_least(text, 0)


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


def _check_windows(flag: str, count: int, seq: int, corpus, what: str) -> None:
    """Fail before the model loads where ``corpus``'s validation text (``what``) holds fewer
    than ``count`` windows of ``seq`` bytes, naming the most it holds."""
    most = corpus.val.numel() // seq
    if count > most:
        raise UsageError(
            f"{flag} {count} is more than {what} holds: at most {most} windows of --seq {seq}"
        )


def _check_out(path: str | None) -> None:
    """Fail before the work, not after it, where ``--out`` cannot be written."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")
