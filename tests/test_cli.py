"""The ``capmoe`` command line (issue 25): one-line errors, help, progress, sweep -> report.

In process through ``main(argv)``; only ``test_sweep_then_report`` compiles (the shipped tiny
model, one graph, one batch of 2 x 32)."""

from __future__ import annotations

import argparse
import io
import json
import sys

import pytest
import torch

from capmoe_compile.tools import cli
from capmoe_compile.tools.progress import Progress


def run(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``capmoe argv`` that exits through SystemExit."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def one_line_error(code, err, *, status=2) -> str:
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("capmoe: error: "), err
    assert "Traceback" not in err
    return err


def _sweep_like() -> dict:
    layer = {"name": "model.layers.0.mlp", "tokens": 8, "capacity": None, "calls": 1,
             "loads_before": [6, 4, 4, 2], "loads_after": [6, 4, 4, 2]}  # fmt: skip

    def row(gamma, policy, ppl, speed):
        cap = None if gamma is None else 4
        after = [6, 4, 4, 2] if gamma is None else [4, 4, 4, 2]
        return {"gamma": gamma, "policy": policy, "perplexity": ppl, "accuracy": 0.5,
                "modeled_speedup": speed,
                "layers": [{**layer, "capacity": cap, "loads_after": after}]}  # fmt: skip

    return {
        "benchmark": "quality",
        "tokens_per_call": 8,
        "rows": [row(None, None, 4.0, 1.0), row(1.0, "score", 4.5, 1.5)],
    }


# --------------------------------------------------------------------------------------------
# one-line errors, exit code 2
# --------------------------------------------------------------------------------------------


def test_unknown_model_says_what_a_model_is(capsys):
    err = one_line_error(
        *run(["calibrate", "--model", "nosuchmodel", "--target", "1.3"], capsys)[::2]
    )
    assert "nosuchmodel" in err and "`tiny`, `balanced` or a model directory" in err


def test_model_typo_did_you_mean(capsys):
    err = one_line_error(*run(["calibrate", "--model", "tiy", "--target", "1.3"], capsys)[::2])
    assert "did you mean 'tiny'?" in err


def test_directory_without_config_is_not_a_model(tmp_path, capsys):
    err = one_line_error(
        *run(["calibrate", "--model", str(tmp_path), "--target", "1.3"], capsys)[::2]
    )
    assert "no config.json" in err


def test_bad_option_values_did_you_mean(capsys):
    err = one_line_error(*run(["demo", "--policy", "scroe"], capsys)[::2])
    assert "did you mean 'score'?" in err and "capmoe demo --help" in err
    err = one_line_error(
        *run(["calibrate", "--target", "1.3", "--policies", "score,ordr"], capsys)[::2]
    )
    assert "unknown policy 'ordr'" in err and "did you mean 'order'?" in err
    err = one_line_error(*run(["demo", "--gamma", "0"], capsys)[::2])
    assert "--gamma" in err and "> 0" in err


def test_mistyped_option_is_named_with_the_closest(capsys):
    """``--traget 1.3`` is an unrecognized ``--traget`` (not a missing ``--target``), with the
    option it is closest to; a stray word after it is not named."""
    err = one_line_error(*run(["calibrate", "--traget", "1.3"], capsys)[::2])
    assert "unrecognized argument --traget (did you mean --target?)" in err, err
    assert "capmoe calibrate --help" in err
    err = one_line_error(*run(["demo", "--gama", "0.5"], capsys)[::2])
    assert "unrecognized argument --gama (did you mean --gamma?)" in err, err
    err = one_line_error(*run(["calibrate", "--target=1.3", "--windws=4"], capsys)[::2])
    assert "unrecognized argument --windws (did you mean --windows?)" in err, err
    err = one_line_error(*run(["calibrate", "-q"], capsys)[::2])  # known options: still missing
    assert "--target --max-ppl-increase is required" in err, err


def test_plan_of_a_missing_file_ends_as_the_other_commands(tmp_path, capsys):
    missing = tmp_path / "loads.json"
    argv = ["plan", str(missing), "--ranks", "2", "--out", str(tmp_path / "plan.json")]
    err = one_line_error(*run(argv, capsys)[::2])
    assert f"{missing} does not exist" in err, err
    err = one_line_error(*run([*argv[:2], "--ranks", "0", *argv[4:]], capsys)[::2])
    assert "--ranks must be >= 1" in err, err


def test_more_windows_than_the_text_holds_names_the_most(capsys):
    """Before the model loads: the flag, and the most windows the text holds at that --seq."""
    from capmoe_compile.models import split_validation, stdlib_corpus

    corpus = stdlib_corpus()
    cal, held = split_validation(corpus)
    err = one_line_error(*run(["calibrate", "--target", "1.3", "--windows", "99999"], capsys)[::2])
    most = cal.val.numel() // 256
    assert "--windows 99999 is more than the calibration text holds: at most " in err, err
    assert f"at most {most} windows of --seq 256" in err, err
    argv = ["calibrate", "--target", "1.3", "--held-out", "99999", "--seq", "64"]
    err = one_line_error(*run(argv, capsys)[::2])
    most = held.val.numel() // 64
    assert f"--held-out 99999 is more than the held-out text holds: at most {most}" in err, err
    err = one_line_error(*run(["sweep", "--windows", "99999"], capsys)[::2])
    assert f"the validation text holds: at most {corpus.val.numel() // 256} windows" in err, err


def test_report_of_a_calibration_says_what_it_wants(tmp_path, capsys):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"layers": {"model.layers.0.mlp": {}}, "search": {}}))
    err = one_line_error(*run(["report", "--results", str(path)], capsys)[::2])
    assert "is a calibration" in err and "not a quality sweep" in err
    assert "capmoe sweep --out" in err


def test_report_of_a_truncated_json_says_where(tmp_path, capsys):
    text = json.dumps(_sweep_like(), indent=1)
    path = tmp_path / "q.json"
    path.write_text(text[: len(text) // 2])
    err = one_line_error(*run(["report", "--results", str(path)], capsys)[::2])
    assert str(path) in err and "not valid JSON" in err and "line " in err
    assert "truncated" in err


def test_report_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_sweep_like()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    err = one_line_error(*run(["report", "--results", str(path)], capsys)[::2])
    assert "pip install 'capmoe-compile[report]'" in err


def test_report_gamma_not_in_the_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_sweep_like()))
    err = one_line_error(*run(["report", "--results", str(path), "--gamma", "0.5"], capsys)[::2])
    assert "--gamma 0.5" in err and "(1)" in err


def test_debug_gives_the_traceback(tmp_path, capsys):
    for argv in (
        ["--debug", "calibrate", "--model", "nosuchmodel", "--target", "1.3"],
        ["calibrate", "--model", "nosuchmodel", "--target", "1.3", "--debug"],
    ):
        with pytest.raises(cli.UsageError, match="nosuchmodel"):
            cli.main(argv)


def test_unexpected_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def broken(args, progress):
        raise RuntimeError("something\ninternal")

    monkeypatch.setattr(cli, "_report", broken)
    code, _, err = run(["report", "--results", "x.json"], capsys)
    err = one_line_error(code, err, status=1)
    assert "RuntimeError: something internal" in err and "--debug" in err


def test_every_flag_has_help_and_finite_choices():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"demo", "calibrate", "sweep", "report"} <= set(sub.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"capmoe {name} {action.option_strings} has no help"
        flags = {s: a for a in p._actions for s in a.option_strings}
        assert "--debug" in flags and "--quiet" in flags
    demo = {s: a for a in sub.choices["demo"]._actions for s in a.option_strings}
    assert demo["--policy"].choices and "score" in demo["--policy"].choices
    assert demo["--model"].choices == ("shipped", "zoo")
    cal = {s: a for a in sub.choices["calibrate"]._actions for s in a.option_strings}
    assert "expanded_drop" in cal["--policies"].help  # a comma list: the choices in its help


# --------------------------------------------------------------------------------------------
# the library's errors
# --------------------------------------------------------------------------------------------


def test_config_value_did_you_mean():
    from capmoe_compile import config

    with pytest.raises(ValueError, match="got 'scroe'. Did you mean 'score'"):
        config.policy = "scroe"
    with pytest.raises(ValueError, match="Did you mean 'sequence'"):
        config.patch(capacity_scope="sequense")


def test_option_error_without_dynamo_suffix():
    from capmoe_compile.backend import OptionError

    compiled = torch.compile(torch.nn.Linear(4, 4), backend="capmoe", options={"policy": "scroe"})
    with pytest.raises(OptionError) as info:
        compiled(torch.randn(2, 4))
    text = str(info.value)
    assert "Did you mean 'score'" in text
    assert "reporting a bug" not in text and "TORCHDYNAMO_VERBOSE" not in text


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only():
    tty = _Terminal()
    with Progress("calibrate", stream=tty, interval=60) as p:
        p.phase("baseline pass")
    assert "capmoe calibrate [" in tty.getvalue() and "baseline pass" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the line is cleared at the end
    plain = io.StringIO()  # a pipe or a file: nothing
    with Progress("x", stream=plain) as p:
        p.phase("work")
    quiet = _Terminal()  # --quiet: nothing
    with Progress("x", stream=quiet, enabled=False) as p:
        p.phase("work")
    assert plain.getvalue() == "" and quiet.getvalue() == ""


def test_cli_progress_and_quiet(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_sweep_like()))
    argv = ["report", "--results", str(path), "--out-dir", str(tmp_path)]
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(argv) == 0
    assert "capmoe report [" in tty.getvalue()
    tty.seek(0)
    tty.truncate()
    assert cli.main([*argv, "--quiet"]) == 0
    assert tty.getvalue() == ""
    assert "quality_loads" in capsys.readouterr().out


def test_calibrate_progress_callable():
    from capmoe_compile.calibrate import _reporter

    got = []
    _reporter(got.append, 0.0)("check: speedup 1.3x")
    assert got == ["check: speedup 1.3x"]


# --------------------------------------------------------------------------------------------
# capmoe sweep -> capmoe report, what a wheel user has
# --------------------------------------------------------------------------------------------


def test_sweep_then_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.json"
    argv = ["sweep", "--windows", "2", "--batch", "2", "--seq", "32", "--gammas", "off,1"]
    assert cli.main([*argv, "--policies", "score", "--out", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "quality" and len(data["rows"]) == 2
    assert "EP speedup" in capsys.readouterr().out
    assert cli.main(["report", "--results", str(out), "--out-dir", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "quality_tradeoff.png").stat().st_size > 0
