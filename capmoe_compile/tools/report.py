"""Plots of a quality sweep (``benchmarks/quality.py``'s JSON), with matplotlib's Agg canvas.

    capmoe report --results quality.json [--out-dir .]

writes

- ``quality_loads.png``: per MoE layer, every expert's load (tokens per call) as the model
  routes it, and after capacity with ``score`` (Token Drop) and ``expanded_drop`` at one gamma,
  with the capacity ``C`` marked: the paper's load profiles;
- ``quality_tradeoff.png``: perplexity against the modeled expert-parallel speedup, one curve
  per policy over gamma (capacity off at 1x), the Pareto front (no other cell is both faster
  and better) marked.

The plot functions return the ``matplotlib.figure.Figure`` they drew, so callers (and tests) can
inspect axes, labels and lines. No pyplot state is touched: figures are made with
``matplotlib.figure.Figure`` and saved through ``FigureCanvasAgg``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["pareto_front", "plot_loads", "plot_tradeoff", "write_report"]

#: One colour per policy, stable across plots.
POLICY_COLORS = {
    "score": "tab:blue",
    "order": "tab:orange",
    "reverse": "tab:green",
    "random": "tab:purple",
    "expanded_drop": "tab:red",
    "reroute": "tab:brown",
}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _load(results: str | Path | dict) -> dict:
    if isinstance(results, dict):
        return results
    return json.loads(Path(results).read_text())


def _row(result: dict, gamma, policy) -> dict | None:
    for r in result["rows"]:
        if r["gamma"] == gamma and r["policy"] == policy:
            return r
    return None


def plot_loads(results: str | Path | dict, gamma: float = 1.0, policies=("score", "expanded_drop")):
    """Bar charts, one per MoE layer: each expert's load per call as routed (grey) and after
    capacity at ``gamma`` under each of ``policies``, with ``C`` as a dashed line."""
    import numpy as np

    result = _load(results)
    base = _row(result, None, None)
    if base is None:
        raise ValueError("results have no capacity-off row")
    cells = [(p, _row(result, gamma, p)) for p in policies]
    cells = [(p, r) for p, r in cells if r is not None]
    if not cells:
        raise ValueError(f"results have no row at gamma={gamma} for {policies}")
    # "as routed": the model's own top-k in the first policy's run (later layers' routing
    # already reflects what earlier layers dropped, so the off run's loads would not match)
    layers = cells[0][1]["layers"]
    n = len(layers)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig = _figure(5.2 * cols, 3.3 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    width = 0.8 / (1 + len(cells))
    tokens = layers[0]["tokens"]
    for i, layer in enumerate(layers):
        ax = axes[i]
        before = np.asarray(layer["loads_before"])
        x = np.arange(before.size)
        mean = before.mean()
        ax.bar(
            x - 0.4 + width / 2,
            before,
            width,
            color="0.6",
            label=f"as routed (max/mean {before.max() / mean:.2f})",
            edgecolor="0.4",
            linewidth=0.4,
        )
        cap = None
        for j, (policy, row) in enumerate(cells, start=1):
            lay = row["layers"][i]
            after = np.asarray(lay["loads_after"])
            cap = lay["capacity"]
            ax.bar(
                x - 0.4 + width / 2 + j * width,
                after,
                width,
                color=POLICY_COLORS.get(policy, None),
                label=f"{policy} (max/mean {after.max() / mean:.2f})",
            )
        if cap is not None:
            ax.axhline(cap, color="k", linestyle="--", linewidth=1, label=f"capacity C = {cap}")
        ax.axhline(mean, color="0.3", linestyle=":", linewidth=1, label=f"mean {mean:.0f}")
        name = layer["name"].replace("model.", "").replace(".mlp", "")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("tokens per call")
        ax.set_xticks(x)
        ax.set_ylim(0, 1.45 * max(before.max(), cap or 0))
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    for ax in axes[n:]:
        ax.set_visible(False)
    k = round(sum(layers[0]["loads_before"]) / tokens) if tokens else "?"
    fig.suptitle(
        f"Expert load per layer before / after capacity, gamma = {gamma} "
        f"(mean per call of {tokens} tokens, k = {k}; max/mean relative to the routed mean)",
        fontsize=10,
    )
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, for (speedup: higher is better,
    perplexity: lower is better), sorted by speedup."""
    front = []
    for i, (s, q) in enumerate(points):
        dominated = any(
            (s2 >= s and q2 <= q) and (s2 > s or q2 < q)
            for j, (s2, q2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def plot_tradeoff(results: str | Path | dict, metric: str = "perplexity"):
    """``metric`` (perplexity by default) against modeled EP speedup: one curve per policy
    over gamma, starting at capacity off; the Pareto front over all cells marked."""
    result = _load(results)
    base = _row(result, None, None)
    policies = []
    for r in result["rows"]:
        if r["policy"] is not None and r["policy"] not in policies:
            policies.append(r["policy"])
    fig = _figure(8.0, 5.4)
    ax = fig.subplots()
    cells = [r for r in result["rows"] if r["policy"] is not None]
    for policy in policies:
        rows = sorted((r for r in cells if r["policy"] == policy), key=lambda r: -(r["gamma"] or 0))
        xs = [base["modeled_speedup"]] + [r["modeled_speedup"] for r in rows]
        ys = [base[metric]] + [r[metric] for r in rows]
        ax.plot(xs, ys, marker="o", markersize=4, color=POLICY_COLORS.get(policy), label=policy)
    for r in cells:
        if r["policy"] == "score":
            ax.annotate(
                f"γ={r['gamma']:g}",
                (r["modeled_speedup"], r[metric]),
                textcoords="offset points",
                xytext=(-6, 6),
                ha="right",
                fontsize=7,
                color=POLICY_COLORS["score"],
            )
    everything = [base, *cells]
    points = [(r["modeled_speedup"], r[metric]) for r in everything]
    front = pareto_front(points)
    fx = [points[i][0] for i in front]
    fy = [points[i][1] for i in front]
    # the front's staircase: between two front points, the best quality reachable at that speed
    ax.step(fx, fy, where="pre", color="k", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="k", linewidths=1.2, zorder=5)
    lines = ["Pareto front:"]
    for i in front:
        r = everything[i]
        name = "off" if r["policy"] is None else f"{r['policy']} γ={r['gamma']:g}"
        lines.append(f"{name}: {r['modeled_speedup']:.2f}x, {metric} {r[metric]:.3g}")
    ax.text(
        0.98,
        0.02,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        family="monospace",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )
    ax.axhline(base[metric], color="0.5", linewidth=0.8, linestyle=":")
    label = {"perplexity": "held-out perplexity (per byte)", "accuracy": "next-token accuracy"}
    ax.set_xlabel("modeled expert-parallel speedup (max load before / after)")
    ax.set_ylabel(label.get(metric, metric))
    values = [p[1] for p in points]
    if metric == "perplexity" and max(values) > 3 * min(values):
        from matplotlib.ticker import LogLocator, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
        ax.tick_params(axis="y", which="minor", labelleft=False)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    tokens = result.get("tokens_per_call")
    ax.set_title(
        f"Quality vs modeled speed, tiny MoE LM, {tokens} tokens per call "
        f"(capacity off: ppl {base['perplexity']:.3f})",
        fontsize=10,
    )
    return fig


def write_report(
    results: str | Path | dict,
    out_dir: str | Path,
    gamma: float = 1.0,
) -> dict[str, tuple[Path, object]]:
    """Write both PNGs into ``out_dir``; returns ``{name: (path, figure)}``."""
    result = _load(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, fig in (
        ("quality_loads", plot_loads(result, gamma=gamma)),
        ("quality_tradeoff", plot_tradeoff(result)),
    ):
        path = out / f"{name}.png"
        fig.savefig(path)
        made[name] = (path, fig)
    return made
