"""The comparison logic of ``python -m benchmarks.ci`` on synthetic figures (no compiles)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/
ci = importlib.import_module("benchmarks.ci")

BASE = {
    "models/mixtral.grouped_mm/layers_matched": 2,
    "models/mixtral.grouped_mm/unmatched": 0,
    "models/mixtral.grouped_mm/graph_breaks": 0,
    "models/mixtral.grouped_mm/recompiles_batch": 0,
    "kernels/mixtral.block/capmoe.kernels": 12,
    "kernels/mixtral.block/capmoe.bytes": 2_000_000,
    "loads/mixtral/score/layer0.max_over_mean": 1.75,
    "loads/mixtral/score/layer0.dropped": 219,
    "loads/mixtral/score/layer0.speedup": 2.859375,
}


def _by_name(findings):
    return {f.name: f for f in findings}


def test_identical_figures_pass():
    findings = ci.compare(BASE, dict(BASE))
    assert [f.status for f in findings] == ["ok"] * len(BASE)
    assert not any(f.failed for f in findings)


@pytest.mark.parametrize(
    "name, new",
    [
        ("models/mixtral.grouped_mm/layers_matched", 1),  # fewer layers matched
        ("models/mixtral.grouped_mm/unmatched", 2),
        ("models/mixtral.grouped_mm/graph_breaks", 1),
        ("models/mixtral.grouped_mm/recompiles_batch", 1),
        ("kernels/mixtral.block/capmoe.kernels", 13),  # one more kernel
        ("kernels/mixtral.block/capmoe.bytes", 2_600_000),  # 30% more bytes (slack is 25%)
    ],
)
def test_regression_detected_and_named(name, new):
    f = _by_name(ci.compare(BASE, {**BASE, name: new}))[name]
    assert f.status == "regression" and f.failed
    msg = f.message()
    assert name in msg and "REGRESSION" in msg
    assert f"baseline {ci._fmt(BASE[name])}" in msg and f"new {ci._fmt(new)}" in msg


@pytest.mark.parametrize(
    "name, new",
    [
        ("models/mixtral.grouped_mm/layers_matched", 3),
        ("models/mixtral.grouped_mm/unmatched", 0),
        ("kernels/mixtral.block/capmoe.kernels", 9),
        ("kernels/mixtral.block/capmoe.bytes", 1_500_000),
    ],
)
def test_improvements_do_not_fail(name, new):
    base = {**BASE, "models/mixtral.grouped_mm/unmatched": 1}
    f = _by_name(ci.compare(base, {**base, name: new}))[name]
    assert not f.failed
    assert f.status == ("ok" if new == base[name] else "improved")


def test_exact_figures_tolerance():
    name = "loads/mixtral/score/layer0.max_over_mean"
    within = ci.compare(BASE, {**BASE, name: BASE[name] + 1e-9})
    assert not any(f.failed for f in within)
    # deterministic figures fail on any real change, in either direction
    for new in (BASE[name] + 1e-3, BASE[name] - 1e-3):
        f = _by_name(ci.compare(BASE, {**BASE, name: new}))[name]
        assert f.status == "changed" and f.failed
        assert "CHANGED" in f.message() and "1.75" in f.message()
    dropped = "loads/mixtral/score/layer0.dropped"
    assert _by_name(ci.compare(BASE, {**BASE, dropped: 218}))[dropped].failed


def test_missing_fails_new_does_not():
    current = dict(BASE)
    gone = current.pop("kernels/mixtral.block/capmoe.bytes")
    current["models/olmoe.grouped_mm/layers_matched"] = 2
    found = _by_name(ci.compare(BASE, current))
    missing = found["kernels/mixtral.block/capmoe.bytes"]
    assert missing.status == "missing" and missing.failed and str(gone) in missing.message()
    new = found["models/olmoe.grouped_mm/layers_matched"]
    assert new.status == "new" and not new.failed


def test_every_rule_is_known_and_unknown_figure_rejected():
    for name in BASE:
        assert ci.rule_for(name) in ("max", "min", "exact")
    with pytest.raises(KeyError, match="no comparison rule"):
        ci.rule_for("models/x/mystery")


def test_timing_gate_only_past_the_wide_margin():
    ok = {"capmoe_off/inductor": 1.49, "capmoe_g1/inductor": 0.6, "eager/inductor": 3.0}
    assert ci.check_timing(ok) == []  # eager may be anything: it is not gated
    bad = ci.check_timing({**ok, "capmoe_off/inductor": 1.6})
    assert len(bad) == 1 and "capmoe_off/inductor" in bad[0] and "1.60x" in bad[0]


def test_paired_ratios_use_median_of_rounds():
    times = {
        "inductor": [1.0, 2.0, 1.0],
        "capmoe_off": [1.2, 2.4, 9.0],  # one outlier round
        "capmoe_g1": [0.5, 1.0, 0.5],
        "eager": [1.0, 2.0, 1.0],
    }
    r = ci._ratios(times)
    assert r["capmoe_off/inductor"] == pytest.approx(1.2)
    assert r["capmoe_g1/inductor"] == pytest.approx(0.5)


def test_baseline_files_round_trip_and_diff_friendly(tmp_path):
    figures = {**BASE, "models/olmoe.grouped_mm/graphs": 1}
    paths = ci.write_baselines(figures, {"torch": "x"}, {"capmoe_off/inductor": 1.1}, tmp_path)
    assert {p.name for p in paths} == {"models.json", "kernels.json", "loads.json", "timing.json"}
    assert ci.load_baselines(tmp_path) == figures  # timing is never a compared figure
    text = (tmp_path / "models.json").read_text()
    assert json.loads(text)["meta"] == {"torch": "x"}
    # one figure per line, so a baseline diff names each figure that changed
    for name in figures:
        if name.startswith("models/"):
            assert sum(name in line for line in text.splitlines()) == 1


def test_update_refuses_injected_regression():
    with pytest.raises(SystemExit):
        ci.main(["--update", "--inject-regression", "matcher"])


def test_estimated_bytes_within_slack_pass():
    name = "kernels/mixtral.block/capmoe.bytes"
    f = _by_name(ci.compare(BASE, {**BASE, name: 2_200_000}))[name]  # +10%, slack 25%
    assert f.status == "ok" and not f.failed
