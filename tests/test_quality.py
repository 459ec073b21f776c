"""The shipped tiny MoE LM, the quality report's plots, and the lm-eval bridge (issue 6).

The loader tests need transformers; the report tests matplotlib; the bridge test lm-eval
(``pip install -e '.[eval]'``): each group is skipped, with the reason, when its package is
missing. Everything runs offline.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from capmoe_compile.models import (  # noqa: E402
    TINY_MOE_DIR,
    decode,
    encode,
    load_tiny_moe,
    stdlib_corpus,
    tiny_moe_card,
    validation_windows,
)
from capmoe_compile.testing import zoo  # noqa: E402

TEXT = '''def _check(self, value):
    """Return the value, or raise ValueError."""
    if not isinstance(value, int):
        raise TypeError("expected an int, got %r" % (value,))
    return value
'''


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    with torch.no_grad():
        yield load_tiny_moe()


@pytest.fixture(scope="module")
def held_out():
    return validation_windows(stdlib_corpus(), 256, 8)


# --------------------------------------------------------------------------------------------
# the shipped model
# --------------------------------------------------------------------------------------------


def test_shipped_files_small_and_offline(monkeypatch, tiny):
    weights = TINY_MOE_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 5 * 1024 * 1024
    card = tiny_moe_card()
    assert card["aux_loss"] == 0.0
    assert card["corpus"]["sha256"] and card["corpus"]["python"]
    assert card["final_val_loss"] < 2.0  # trained: a uniform byte model scores ln(259) = 5.56
    # a second load with every network path closed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tok = load_tiny_moe()
    assert model.config.model_type == "mixtral"
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    assert sum(p.numel() for p in model.parameters()) < 2.5e6


def test_tokenizer_is_bytes(tiny):
    _, tok = tiny
    ids = encode(TEXT, tok)
    assert torch.equal(ids, encode(TEXT))  # the tokenizer and the byte rule agree
    assert decode(ids) == TEXT
    assert len(tok) == 259 and tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_output_deterministic_and_trained(tiny):
    model, _ = tiny
    ids = encode(TEXT)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids).logits
    assert torch.equal(a, b)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:]).item()
    assert loss < 2.5, loss  # far below the uniform 5.56: it knows Python
    # greedy continuation of a common idiom
    prompt = encode('if __name__ == "__')
    with torch.no_grad():
        for _ in range(6):
            nxt = model(prompt).logits[0, -1].argmax()
            prompt = torch.cat([prompt, nxt.view(1, 1)], dim=1)
    assert decode(prompt).startswith('if __name__ == "__main')


def test_routing_skewed(tiny, held_out):
    model, _ = tiny
    loads = zoo.expert_loads(model, held_out)
    ratios = [zoo.load_ratio(c) for c in loads.values()]
    assert len(ratios) == 4
    # no balancing loss: most layers route well over twice the mean to their busiest expert
    assert sum(r > 2.5 for r in ratios) >= 2, ratios
    assert max(ratios) <= 4.0 + 1e-6  # the ceiling at E=8, k=2


def test_validation_split_is_held_out():
    corpus = stdlib_corpus()
    names = corpus.version["val_files"]
    assert 0 < len(names) < corpus.version["files"] // 4
    assert corpus.val.numel() > 100_000 and corpus.train.numel() > 8 * corpus.val.numel()


# --------------------------------------------------------------------------------------------
# quality aggregation and the report
# --------------------------------------------------------------------------------------------


def test_evaluate_cell_aggregates(tiny, held_out):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.quality import evaluate_cell, format_table
    from capmoe_compile.telemetry import LayerStats

    model, _ = tiny

    def run(ids):
        before = torch.tensor([6, 2, 0, 0])
        after = torch.tensor([3, 2, 0, 0])
        stats = [LayerStats("l0", 4, 3, before, after, dropped=3, added=0)]
        with torch.no_grad():
            return model(ids).logits, stats

    res = evaluate_cell(run, held_out[:4], batch=2)
    assert res["dropped"] == 6 and res["pairs"] == 16
    assert res["modeled_speedup"] == pytest.approx(2.0)
    assert math.isclose(res["perplexity"], math.exp(res["loss"]))
    assert 0.3 < res["accuracy"] < 1
    assert res["layers"][0]["loads_after"] == [3.0, 2.0, 0.0, 0.0]
    table = format_table(
        {
            "rows": [
                {
                    "gamma": None,
                    "policy": None,
                    "perplexity_change": 0.0,
                    "accuracy_change": 0.0,
                    **res,
                }
            ]
        }  # fmt: skip
    )
    assert "off" in table and "EP speedup" in table


def _fake_results() -> dict:
    """A small sweep in quality.json's shape: 2 layers, 4 experts, 2 policies."""

    def layer(name, before, after, cap):
        return {"name": name, "tokens": 8, "capacity": cap, "calls": 1,
                "loads_before": before, "loads_after": after}  # fmt: skip

    def row(gamma, policy, ppl, speed, after):
        return {
            "gamma": gamma,
            "policy": policy,
            "perplexity": ppl,
            "accuracy": 0.5,
            "modeled_speedup": speed,
            "layers": [
                layer("model.layers.0.mlp", [10, 4, 2, 0], after, 4 if gamma else None),
                layer("model.layers.1.mlp", [8, 8, 0, 0], after, 4 if gamma else None),
            ],
        }

    return {
        "tokens_per_call": 8,
        "rows": [
            row(None, None, 4.0, 1.0, [10, 4, 2, 0]),
            row(2.0, "score", 4.2, 1.5, [7, 4, 2, 0]),
            row(1.0, "score", 5.0, 2.5, [4, 4, 2, 0]),
            row(2.0, "expanded_drop", 4.1, 1.4, [7, 4, 4, 1]),
            row(1.0, "expanded_drop", 6.0, 2.4, [4, 4, 4, 4]),
        ],
    }


def test_pareto_front():
    from capmoe_compile.tools.report import pareto_front

    pts = [(1.0, 4.0), (1.5, 4.2), (2.5, 5.0), (1.4, 4.1), (2.4, 6.0), (1.2, 4.5)]
    assert pareto_front(pts) == [0, 3, 1, 2]


def test_report_writes_labelled_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from capmoe_compile.tools.report import write_report

    path = tmp_path / "quality.json"
    path.write_text(json.dumps(_fake_results()))
    made = write_report(path, tmp_path / "out", gamma=1.0)
    assert set(made) == {"quality_loads", "quality_tradeoff"}
    for png, _ in made.values():
        data = png.read_bytes()
        assert png.parent == tmp_path / "out" and data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000

    loads = made["quality_loads"][1]
    axes = [ax for ax in loads.axes if ax.get_visible()]
    assert len(axes) == 2  # one per layer
    for ax in axes:
        assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "tokens per call"
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(s.startswith("as routed") for s in labels)
        assert any(s.startswith("score") for s in labels)
        assert any(s.startswith("expanded_drop") for s in labels)
        assert "capacity C = 4" in labels
    assert "gamma = 1.0" in loads._suptitle.get_text()

    (ax,) = made["quality_tradeoff"][1].axes
    assert "speedup" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["score", "expanded_drop", "Pareto front"]
    curves = {line.get_label(): line for line in ax.get_lines()}
    # each policy's curve starts at capacity off (1x) and walks gamma down
    assert list(curves["score"].get_xdata()) == [1.0, 1.5, 2.5]
    assert list(curves["expanded_drop"].get_ydata()) == [4.0, 4.1, 6.0]
    front = curves["Pareto front"]
    assert list(front.get_xdata())[0] == 1.0 and max(front.get_xdata()) == 2.5


def test_cli_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from capmoe_compile.tools.cli import main

    path = tmp_path / "q.json"
    path.write_text(json.dumps(_fake_results()))
    assert main(["report", "--results", str(path), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "quality_loads.png").stat().st_size > 0
    assert "quality_tradeoff" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the lm-eval bridge
# --------------------------------------------------------------------------------------------


def test_lm_eval_bridge_local_task(tiny):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")
    pytest.importorskip("accelerate", reason="lm-eval[hf] not installed")
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from capmoe_compile.tools.lm_eval_bridge import CapmoeLM, task_dir

    assert get_model("capmoe") is CapmoeLM
    model, tok = tiny
    # only the packaged task: indexing lm-eval's own thousands of task YAMLs took a minute
    tasks = TaskManager(include_path=str(task_dir()), include_defaults=False)

    def evaluate(lm):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=["capmoe_pycode"], task_manager=tasks, limit=8, bootstrap_iters=0
        )
        logliks = [r[0][0] for s in out["samples"]["capmoe_pycode"] for r in s["resps"]]
        return out["results"]["capmoe_pycode"], logliks

    eager, eager_ll = evaluate(
        HFLM(pretrained=model, tokenizer=tok, max_length=1024, add_bos_token=False)
    )
    lm = CapmoeLM(pretrained="tiny_moe", capacity_factor="none")
    off, off_ll = evaluate(lm)
    # capacity off: the compiled model scores exactly what eager scores
    assert off_ll == pytest.approx(eager_ll, abs=1e-3)
    assert off["acc,none"] == eager["acc,none"] >= 0.5  # it knows some Python
    summary = lm.capmoe_summary()
    assert summary["calls"] > 0 and summary["dropped"] == 0

    lm.set_capmoe_options(capacity_factor=0.5, policy="score")
    lm.reset_capmoe_stats()
    capped, capped_ll = evaluate(lm)
    summary = lm.capmoe_summary()
    assert summary["dropped"] > 0 and summary["modeled_speedup"] > 1.0
    assert capped_ll != pytest.approx(off_ll, abs=1e-3)
    assert 0.0 <= capped["acc,none"] <= 1.0
