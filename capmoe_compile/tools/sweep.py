"""``capmoe sweep``: quality against modeled speed over a grid of capacity settings.

    capmoe sweep --out quality.json [--model tiny] [--windows 64] [--gammas 1.5,1,0.75]
    capmoe report --results quality.json

Compiles the model once with ``backend="capmoe"`` (static shape ``[batch, seq]``; a second
graph for ``expanded_drop``, whose routed width differs), then for gamma in {off, 2.0, 1.5,
1.25, 1.0, 0.75, 0.5} x every policy of SPEC.md runs held-out validation windows (files of the
Python standard library the shipped models never trained on) and reports, per cell:

- perplexity (per byte) and next-token accuracy, and the perplexity change against "off";
- pairs dropped (and added, for ``expanded_drop`` / ``reroute``) as a share of the model's own
  ``T * k`` pairs;
- max/mean expert load after capacity (mean over layers and calls);
- the modeled expert-parallel speedup of the MoE layers: the sum over layers and calls of
  ``max_load_before`` over the same sum of ``max_load_after`` (SPEC.md's figure, at equal
  per-token expert cost; attention and everything else excluded).

Capacity is per call (``capacity_scope="batch"``, the paper's): ``T = batch * seq`` tokens.
The JSON (``"benchmark": "quality"``) is what ``capmoe report`` plots; ``benchmarks/quality.py``
is this sweep with the benchmark's defaults (512 windows). Deterministic: no timing is
measured, one CPU thread by default.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["GAMMAS", "describe", "evaluate_cell", "format_table", "run", "save"]

GAMMAS: tuple[float | None, ...] = (None, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5)

#: printed under the table
LEGEND = (
    "(ppl: perplexity per byte; dropped / added: share of the model's T*k pairs; "
    "max/mean: expert load after capacity; EP speedup: sum of max loads before / after, "
    "SPEC.md's model)"
)


@torch.no_grad()
def evaluate_cell(run, windows: torch.Tensor, batch: int) -> dict:
    """Loss, accuracy and record_stats figures of one (gamma, policy) over all windows.

    ``run(ids) -> (logits, layer_stats)``.
    """
    nll, correct, count = 0.0, 0, 0
    per_layer: dict[str, dict] = {}
    sum_max_before = sum_max_after = 0
    pairs = dropped = added = 0
    imbalance_after, imbalance_before, calls = 0.0, 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits, layers = run(x)
        logits = logits[:, :-1].float()
        target = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
        for s in layers:
            rec = per_layer.setdefault(
                s.name,
                {
                    "loads_before": torch.zeros_like(s.loads_before),
                    "loads_after": torch.zeros_like(s.loads_after),
                    "capacity": s.capacity,
                    "tokens": s.tokens,
                    "calls": 0,
                    "max_before": 0,
                    "max_after": 0,
                },
            )
            rec["loads_before"] += s.loads_before
            rec["loads_after"] += s.loads_after
            rec["calls"] += 1
            rec["max_before"] += int(s.loads_before.max())
            rec["max_after"] += int(s.loads_after.max())
            sum_max_before += int(s.loads_before.max())
            sum_max_after += int(s.loads_after.max())
            pairs += int(s.loads_before.sum())
            dropped += s.dropped
            added += s.added
            imbalance_after += s.imbalance_after
            imbalance_before += s.imbalance_before
            calls += 1
    loss = nll / count
    layers_out = [
        {
            "name": name,
            "tokens": r["tokens"],
            "capacity": r["capacity"],
            "calls": r["calls"],
            # mean per call: what one call's capacity C bounds
            "loads_before": [v / r["calls"] for v in r["loads_before"].tolist()],
            "loads_after": [v / r["calls"] for v in r["loads_after"].tolist()],
            "modeled_speedup": r["max_before"] / r["max_after"] if r["max_after"] else 1.0,
        }
        for name, r in per_layer.items()
    ]
    for out, r in zip(layers_out, per_layer.values(), strict=True):
        mean = float(r["loads_before"].float().mean()) / r["calls"]
        out["max_over_mean_before"] = r["max_before"] / r["calls"] / mean if mean else 1.0
        out["max_over_mean_after"] = r["max_after"] / r["calls"] / mean if mean else 1.0
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct / count,
        "tokens_scored": count,
        "pairs": pairs,
        "dropped": dropped,
        "added": added,
        "dropped_share": dropped / pairs if pairs else 0.0,
        "added_share": added / pairs if pairs else 0.0,
        "imbalance_before": imbalance_before / calls if calls else 1.0,
        "imbalance_after": imbalance_after / calls if calls else 1.0,
        "modeled_speedup": sum_max_before / sum_max_after if sum_max_after else 1.0,
        "layers": layers_out,
    }


def run(
    *,
    batch: int = 8,
    seq: int = 256,
    windows: int = 512,
    policies: tuple[str, ...] | None = None,
    gammas: tuple[float | None, ...] = GAMMAS,
    model_path: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """The sweep: every (gamma, policy) cell over ``windows`` held-out windows of ``seq`` bytes,
    ``batch`` windows per call. ``model_path``: ``"tiny"`` (default), ``"balanced"`` or a model
    directory. ``progress(done, total, text)`` is called before the first cell and after each."""
    import capmoe_compile as cc
    from capmoe_compile import backend
    from capmoe_compile.models import (
        BALANCED_MOE_DIR,
        TINY_MOE_DIR,
        load_tiny_moe,
        stdlib_corpus,
        validation_windows,
    )

    t0 = time.perf_counter()
    policies = tuple(policies or cc.POLICIES)
    shipped = {"tiny": TINY_MOE_DIR, "balanced": BALANCED_MOE_DIR}
    model_dir = shipped.get(model_path or "tiny", model_path)
    model, _ = load_tiny_moe(model_dir)
    corpus = stdlib_corpus()
    data = validation_windows(corpus, seq, windows)
    windows = data.shape[0] - data.shape[0] % batch
    data = data[:windows]

    compiles_before = backend.compile_count()
    graph = {"kind": None, "fn": None}

    def call(ids, gamma, policy):
        # expanded_drop gives tokens up to E experts, a different graph (capmoe raises rather
        # than reuse the k-wide one): one compile for it, one for everything else
        kind = "expanded" if gamma is not None and cc.routing.widens(policy) else "k"
        if graph["kind"] != kind:
            torch._dynamo.reset()
            graph.update(kind=kind, fn=torch.compile(model, backend="capmoe", dynamic=False))
        with cc.config.patch(capacity_factor=gamma, policy=policy):
            with cc.record_stats() as st:
                logits = graph["fn"](ids).logits
        return logits, st.layers

    with torch.no_grad():
        # the compiled model with capacity off must compute what eager computes (SPEC.md)
        eager = model(data[:batch]).logits
        off = call(data[:batch], None, "score")[0]
        eager_diff = (off - eager).abs().max().item()

    cells = [(None, "-")] + [(g, p) for g in gammas if g is not None for p in policies]
    order = sorted(
        range(len(cells)), key=lambda i: cells[i][0] is not None and cc.routing.widens(cells[i][1])
    )
    if progress is not None:
        progress(0, len(cells), "capacity off")
    rows: list[dict] = [{} for _ in cells]
    for i in order:
        gamma, policy = cells[i]
        res = evaluate_cell(
            lambda ids, g=gamma, p=policy: call(ids, g, "score" if p == "-" else p), data, batch
        )
        rows[i] = {"gamma": gamma, "policy": None if policy == "-" else policy, **res}
        if progress is not None:
            done = order.index(i) + 1
            progress(done, len(cells), f"gamma={gamma} {policy} ppl={res['perplexity']:.3f}")
    base = rows[0]
    for r in rows:
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["accuracy_change"] = r["accuracy"] - base["accuracy"]
    compiles = backend.compile_count() - compiles_before
    card_file = os.path.join(str(model_dir), "training.json")
    card = json.load(open(card_file)) if os.path.exists(card_file) else {}
    cfg = model.config
    return {
        "benchmark": "quality",
        "model": model_path or "capmoe_compile.models.tiny_moe",
        "architecture": (
            f"{cfg.architectures[0] if cfg.architectures else type(model).__name__}: "
            f"E={getattr(cfg, 'num_local_experts', None) or cfg.num_experts}, "
            f"k={cfg.num_experts_per_tok}, {cfg.num_hidden_layers} layers"
            + (", shared expert" if getattr(cfg, "shared_expert_intermediate_size", 0) else "")
        ),
        "model_val_loss_at_training": card.get("final_val_loss"),
        "corpus": {k: v for k, v in corpus.version.items() if k != "val_files"},
        "corpus_matches_training": card.get("corpus", {}).get("sha256") == corpus.version["sha256"],
        "batch": batch,
        "seq": seq,
        "tokens_per_call": batch * seq,
        "windows": windows,
        "capacity_scope": "batch",
        "compiled_vs_eager_max_abs_diff": eager_diff,
        "compiles": compiles,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def describe(result: dict) -> str:
    b = result["rows"][0]
    arch = result.get("architecture", "tiny MoE LM (E=8, k=2, 4 layers)")
    return (
        f"{result['model']} ({arch}), {result['windows']} held-out windows of "
        f"{result['seq']} bytes, {result['tokens_per_call']} tokens per call; "
        f"off: ppl {b['perplexity']:.3f}, acc {b['accuracy']:.1%}, "
        f"max/mean load {b['imbalance_before']:.2f}; "
        f"compiled-vs-eager max |diff| {result['compiled_vs_eager_max_abs_diff']:.1e}; "
        f"graphs compiled: {result['compiles']} (one k-wide, one for expanded_drop)"
    )


def format_table(result: dict) -> str:
    head = (
        f"{'gamma':>5} {'policy':<13} {'ppl':>7} {'d ppl':>7} {'acc':>6} {'d acc':>6} "
        f"{'dropped':>7} {'added':>6} {'max/mean':>8} {'EP speedup':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        gamma = "off" if r["gamma"] is None else str(r["gamma"])
        policy = r["policy"] or "-"
        lines.append(
            f"{gamma:>5} {policy:<13} {r['perplexity']:>7.3f} {r['perplexity_change']:>+7.1%} "
            f"{r['accuracy']:>6.1%} {r['accuracy_change'] * 100:>+6.1f} "
            f"{r['dropped_share']:>7.1%} {r['added_share']:>6.1%} "
            f"{r['imbalance_after']:>8.2f} {r['modeled_speedup']:>9.2f}x"
        )
    return "\n".join(lines)


def save(result: dict, path: str | Path) -> Path:
    """Write ``result`` as JSON at ``path``, and the table beside it (``.txt``)."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".txt").write_text(describe(result) + "\n" + format_table(result) + "\n")
    return path
