"""``capmoe_compile.explain``: which MoE layers the passes found, and why others were left."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import config
from .passes.moe_layers import LayerReport


@dataclasses.dataclass
class ExplainReport:
    layers: list[LayerReport]  # matched MoE layers
    unmatched: list[LayerReport]  # router-like sites left as written, with the reason
    graphs: int  # graphs Dynamo produced (graph breaks + 1 when > 0)

    def __str__(self) -> str:
        head = f"{'layer':<32} {'E':>4} {'k':>3} {'router':<26} {'dispatch':<11} {'experts':<16} {'T':>6} {'C':>6}"
        lines = [f"capmoe: {len(self.layers)} MoE layer(s) matched in {self.graphs} graph(s)", head]
        for r in self.layers:
            cap = "-" if r.capacity is None else str(r.capacity)
            lines.append(
                f"{r.name:<32} {r.num_experts:>4} {r.top_k:>3} {r.router:<26} {r.dispatch:<11} "
                f"{r.experts:<16} {r.tokens if r.tokens is not None else '-':>6} {cap:>6}"
            )
        lines += [f"  {r.name}: experts run by {r.lowering}" for r in self.layers if r.lowering]
        if self.unmatched:
            lines.append(f"left as written ({len(self.unmatched)}):")
            lines += [f"  {r.name}: {r.reason}" for r in self.unmatched]
        return "\n".join(lines)


def explain(model: torch.nn.Module | Callable, **options: Any) -> Callable[..., ExplainReport]:
    """``explain(model, **options)(*args, **kwargs)``: trace ``model`` with Dynamo, run the
    capmoe passes on every graph (nothing is compiled by Inductor), and report.

    The model runs once, eagerly on the rewritten graphs, so the report's capacities are those
    of these inputs.
    """
    from .passes import run_passes

    cfg_options: Mapping[str, Any] = options

    def run(*args: Any, **kwargs: Any) -> ExplainReport:
        config.resolve(cfg_options)  # validate early
        reports: list[LayerReport] = []
        graphs = 0

        def backend(gm, example_inputs):
            nonlocal graphs
            graphs += 1
            reports.extend(run_passes(gm, example_inputs, cfg_options))
            return gm.forward

        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(model, backend=backend)(*args, **kwargs)
        finally:
            torch._dynamo.reset()
        return ExplainReport(
            [r for r in reports if r.matched], [r for r in reports if not r.matched], graphs
        )

    return run
