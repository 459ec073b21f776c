"""``benchmarks/moe_layer.py``'s per-round figures and bars on synthetic runs (no compiles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import moe_layer


def _run(peak_ms, copy_ms, rows):
    """One shape's result as ``run_shape`` records it: ``rows`` name -> (samples_ms, flops
    floor at the median peak, bytes floor at the median bandwidth)."""
    med = moe_layer.median
    return {
        "shape": "fine",
        "dtype": "float32",
        "T": 2048,
        "gemm_peak_samples_ms": peak_ms,
        "copy_bw_samples_ms": copy_ms,
        "gemm_peak_ms": med(peak_ms),
        "copy_bw_ms": med(copy_ms),
        "rows": {
            name: {"samples_ms": s, "ms": med(s), "flops_floor_ms": f, "bytes_floor_ms": b}
            for name, (s, f, b) in rows.items()
        },
    }


def test_paired_follows_a_drifting_machine():
    """Rounds 0-1 run slow (x1.3) for both rows; in round 2 only the peak row is slow (noise).
    The layer's FLOPs are the peak row's, and it runs at 80% of its round's peak in every round
    but round 2. The medians come from different rounds and say 104%, above the peak: per
    round, it is 80%."""
    peak = [130.0, 130.0, 130.0, 100.0, 100.0]
    layer = [162.5, 162.5, 125.0, 125.0, 125.0]
    med = moe_layer.median
    floor_at_median_peak = med(peak)  # the layer's FLOPs at the median peak
    assert floor_at_median_peak / med(layer) == pytest.approx(1.04)  # what the medians say
    res = _run(peak, [10.0] * 5, {"capmoe_off": (layer, floor_at_median_peak, 1.0)})
    r = moe_layer.paired(res)["rows"]["capmoe_off"]
    assert r["frac_peak_paired"] == pytest.approx(0.8)
    assert r["frac_floor_paired"] == pytest.approx(0.8)  # compute-bound: bytes floor tiny
    assert r["frac_bw_paired"] == pytest.approx(1.0 / med(layer))  # copy steady


def test_paired_speedup_takes_the_fastest_other_row_per_round():
    R = {
        "a": {"samples_ms": [10.0, 30.0, 10.0]},
        "b": {"samples_ms": [20.0, 15.0, 20.0]},
        "x": {"samples_ms": [5.0, 10.0, 20.0]},
    }
    # per round: min(a, b) / x = 10/5, 15/10, 10/20 -> median 1.5
    assert moe_layer._paired_speedup(R, ("a", "b"), "x") == pytest.approx(1.5)


def test_bars_use_the_per_round_figures():
    """The fine shape's bars read the per-round figures. capmoe off is at 90% of its round's
    floor in every round but one, where only the peak row ran fast: the medians would read
    69% and fail the 85% bar; per round it is 90% and passes. `score` at 70% in every round
    fails the 80% bar either way."""
    peak = [100.0, 100.0, 100.0, 130.0, 130.0]
    off = [111.1, 111.1, 144.4, 144.4, 144.4]  # 0.9, 0.9, 0.69, 0.9, 0.9 of the round's peak
    floor = moe_layer.median(peak)
    rows = {"capmoe_off": (off, floor, 1.0), "capmoe_score": ([p / 0.7 for p in peak], floor, 1.0)}
    for name in moe_layer.EAGER_ROWS:
        rows[name] = ([p / 0.5 for p in peak], floor, 1.0)
    assert floor / moe_layer.median(off) < 0.85  # what the medians say
    res = moe_layer.paired(_run(peak, [10.0] * 5, rows))
    got = {b["bar"].split(": ", 1)[1]: b for b in moe_layer.bars([res])}
    assert got["capmoe off %floor"]["value"] == pytest.approx(0.9, rel=1e-3)
    assert got["capmoe off %floor"]["ok"]
    assert got["capmoe score %floor"]["value"] == pytest.approx(0.7)
    assert not got["capmoe score %floor"]["ok"]


def test_gpu_check_script_dry_run(tmp_path):
    """``benchmarks/gpu_check.sh`` parses (``bash -n``), and its dry run lists the GPU run's
    steps, writes nothing, and every layer benchmark it would run is a command line
    ``benchmarks/moe_layer.py`` accepts, on CUDA in bf16, one JSON per shape."""
    import shlex
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out_dir = tmp_path / "gpu"
    run = subprocess.run(
        ["bash", str(script), "--dry-run", str(out_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert not out_dir.exists()
    steps = [ln for ln in run.stdout.splitlines() if ln.startswith("== ")]
    bench = [ln.split("): ", 1)[1] for ln in steps if "benchmarks.moe_layer" in ln]
    assert any("tests/test_triton_moe.py" in ln for ln in steps)
    shapes = set()
    for cmd in bench:
        argv = shlex.split(cmd)
        args = moe_layer.parser().parse_args(argv[argv.index("benchmarks.moe_layer") + 1 :])
        assert (args.device, args.dtypes) == ("cuda", "bf16")
        assert args.out == str(out_dir / f"moe_layer_cuda_bf16_{args.shapes}.json")
        shapes.add(args.shapes)
    assert shapes == {"prefill", "decode", "fine", "qwen3", "deepseek"}
