"""The CI subset of the third-party coverage rows (issue 24, part 3): torchtitan's MoE layers
(``TokenChoiceTopKRouter`` + ``GroupedExperts`` + ``LocalTokenDispatcher``, softmax and
sigmoid with an expert bias), built as the library builds them and run through the same
harness as the full record (``benchmarks/third_party.py``): capacity off within its bound of
eager, capacity on equal to the oracle built from torchtitan's own router outputs and
``capmoe_compile.route``. ``bash .ci/run`` installs them (``benchmarks/third_party-ci-
requirements.txt``, ``--no-deps``) and points ``CAPMOE_THIRD_PARTY_PATH`` at them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATH = os.environ.get("CAPMOE_THIRD_PARTY_PATH")
CASES = ("torchtitan_softmax", "torchtitan_sigmoid_bias")


@pytest.mark.skipif(
    not PATH,
    reason="torchtitan is not installed here: bash .ci/run installs the CI subset "
    "(benchmarks/third_party-ci-requirements.txt) and sets CAPMOE_THIRD_PARTY_PATH",
)
def test_torchtitan_rows_are_matched_and_equal_their_oracles(tmp_path):
    out = tmp_path / "third_party.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PATH, str(ROOT)])}
    cmd = [sys.executable, "-m", "benchmarks.third_party", "--cases", ",".join(CASES)]
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, check=True, timeout=1200)
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(CASES), sorted(rows)
    for case, row in rows.items():
        assert row["verdict"] == "matched", (case, row["verdict"], row.get("why"))
        assert row["off"]["diff"] <= row["bound"], (case, row["off"])
        assert row["on"]["oracle_dropped"] > 0 and row["on"]["vs_oracle"] <= 1e-4, row["on"]
