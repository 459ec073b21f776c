"""``capmoe_compile.explain``: which MoE layers the passes found, and why others were left.

Two ways in, one report:

- ``explain(compiled)(*args)``, where ``compiled`` is what the user runs (``torch.compile(model,
  backend="capmoe")``, a model after ``model.compile(backend="capmoe")``, or a model whose
  ``forward`` was compiled): it calls ``compiled`` once and reports the graphs that actually
  ran, as the backend recorded them when it compiled them. Nothing is traced again, nothing is
  reset, no cache entry is added: the user's compiled model computes and costs exactly what it
  did before.
- ``explain(model, **options)(*args)`` on a plain model: traces it with Dynamo through a
  backend that runs the passes and then the rewritten graphs eagerly (no Inductor). It does not
  reset Dynamo either: its graphs are one more cache entry on the model's frames, guarded on
  that backend (one per distinct ``options``), so the user's own compiled callables keep theirs.

Either way the table's ``T`` and ``C`` are those ``record_stats`` sees for the same call: the
rows that count (after padding), and the capacity they get.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch

from . import config, telemetry
from .passes.moe_layers import LayerReport

# Lists receiving the reports of every capmoe graph that runs (explain's collection); empty
# outside explain, so a compiled graph pays one list check per call.
_collecting: list[list[tuple[list[LayerReport], list]]] = []


def installed(compiled: Callable, reports: list[LayerReport]) -> Callable:
    """Wrap a graph the capmoe backend compiled so that ``explain`` can see it run.

    The wrapper keeps the calling convention of ``compiled`` (Inductor's boxed calls)."""

    def run(*args: Any) -> Any:
        if _collecting:
            # the call's inputs (boxed or not), before a boxed call consumes them
            inputs = list(args[0]) if len(args) == 1 and isinstance(args[0], list) else list(args)
            for sink in _collecting:
                sink.append((reports, inputs))
        return compiled(*args)

    run.__dict__.update(getattr(compiled, "__dict__", {}))
    run.__dict__.pop("_torchdynamo_orig_callable", None)
    return run


@dataclasses.dataclass
class ExplainReport:
    layers: list[LayerReport]  # matched MoE layers
    unmatched: list[LayerReport]  # router-like sites left as written, with the reason
    graphs: int  # capmoe graphs that ran for the call (graph breaks + 1 when > 0)
    stats: list[telemetry.LayerStats] = dataclasses.field(default_factory=list)
    graph_breaks: list[str] = dataclasses.field(default_factory=list)  # Dynamo's reasons

    def call_stats(self, layer: LayerReport) -> telemetry.LayerStats | None:
        """The ``record_stats`` figures of ``layer`` in the explained call (first call)."""
        return next((s for s in self.stats if s.name == layer.name), None)

    def __str__(self) -> str:
        head = (
            f"{'layer':<32} {'E':>4} {'k':>3} {'router':<26} {'dispatch':<11} {'experts':<16} "
            f"{'T':>6} {'C':>6}  padding"
        )
        lines = [f"capmoe: {len(self.layers)} MoE layer(s) matched in {self.graphs} graph(s)", head]
        for r in self.layers:
            s = self.call_stats(r)
            tokens = "-" if s is None else str(s.tokens)
            cap = "-" if s is None or s.capacity is None else str(s.capacity)
            pad = r.padding
            if s is not None and s.exempt:
                cap, pad = "exempt", "exempt (configure/exempt): runs as written, all rows count"
            elif s is not None and s.capacity_factor is None:
                cap, pad = "off", "capacity off: runs as written, all rows count"
            elif s is not None and s.capacity is None:
                pad = f"T below min_tokens: runs as written; {r.padding}"
            elif s is not None and not s.padding_excluded and r.padding.startswith("padding"):
                pad = f"all rows count in this call (the mask is not [B, S]); {r.padding}"
            lines.append(
                f"{r.name:<32} {r.num_experts:>4} {r.top_k:>3} {r.router:<26} {r.dispatch:<11} "
                f"{r.experts:<16} {tokens:>6} {cap:>6}  {pad}"
            )
        lines += [f"  {r.name}: experts run by {r.lowering}" for r in self.layers if r.lowering]
        if self.unmatched:
            lines.append(f"left as written ({len(self.unmatched)}):")
            lines += [f"  {r.name}: {r.reason}" for r in self.unmatched]
        if self.graph_breaks:
            lines.append("graph breaks (a router and its experts in different graphs are left):")
            lines += [f"  {b}" for b in self.graph_breaks]
        return "\n".join(lines)


def _with_call_params(report: LayerReport, inputs: list) -> LayerReport:
    """``report`` with the expert parameters of this call: a graph compiled for one model
    instance runs for another of the same shapes, with that instance's parameters as inputs."""
    if not report.matched or not report.param_inputs:
        return report
    params = [
        p if i is None or i >= len(inputs) else inputs[i]
        for p, i in zip(report.params, report.param_inputs, strict=True)
    ]
    return dataclasses.replace(report, params=params)


def is_compiled(model: Any) -> bool:
    """Whether calling ``model`` runs code torch.compile installed (any backend)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    if hasattr(model, "_torchdynamo_orig_callable"):  # a compiled function
        return True
    if getattr(model, "_compiled_call_impl", None) is not None:  # model.compile(...)
        return True
    return hasattr(getattr(model, "forward", None), "_torchdynamo_orig_callable")


_EXPLAIN_BACKENDS: dict[str, Callable] = {}


def _explain_backend(options: dict[str, Any]) -> Callable:
    """The tracing backend for one set of options: the passes, then the rewritten graph runs
    eagerly. One function per options, kept, so that Dynamo's guard on the backend matches on
    the next explain with the same options and no frame collects new cache entries."""
    key = json.dumps(options, sort_keys=True, default=str)
    if key not in _EXPLAIN_BACKENDS:
        from .passes import run_passes

        def capmoe_explain(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            return installed(gm.forward, run_passes(gm, example_inputs, options))

        from .context import compile_context

        capmoe_explain.backend_ctx_ctor = compile_context  # the capmoe backend's, the same graphs
        _EXPLAIN_BACKENDS[key] = capmoe_explain
    return _EXPLAIN_BACKENDS[key]


def _dropped_sites(dropped: list[tuple[list[LayerReport], str]], seen: set[str]) -> list:
    """The sites of graphs the bridge traced with the capture flags and then dropped (traced
    again without them, as Inductor traces) that no graph that ran reports: left as written,
    with the trial's reason, so that ``explain`` still says why such a layer is not rewritten."""
    out: list[LayerReport] = []
    for reports, why in dropped:
        for r in reports:
            if r.name in seen:
                continue
            seen.add(r.name)
            first = r.reason if not r.matched else "matched when traced with the capture flags"
            reason = f"{first}; the graph was traced again without the capture flags ({why})"
            out.append(dataclasses.replace(r, matched=False, reason=reason, params=[]))
    return out


def explain(model: torch.nn.Module | Callable, **options: Any) -> Callable[..., ExplainReport]:
    """``explain(model, **options)(*args, **kwargs)``: report the MoE layers of one call.

    ``model`` compiled with ``backend="capmoe"`` (in any of torch's ways): the graphs that ran,
    as compiled; ``options`` must then be empty (the compiled model's are those given to
    ``torch.compile``). A plain model: traced with the capmoe passes and ``options`` (nothing is
    compiled by Inductor; the model runs once, eagerly, on the rewritten graphs).
    """
    config.resolve(options)  # bad options fail here, as ValueError
    compiled = is_compiled(model)
    if compiled and options:
        raise ValueError(
            "capmoe: explain(compiled_model) reports what the compiled model runs, with the "
            f"options given to torch.compile; got options {sorted(options)}: pass them to "
            "torch.compile, or explain the uncompiled model"
        )

    def run(*args: Any, **kwargs: Any) -> ExplainReport:
        from .bridge import DROPPED_SINKS

        ran: list[tuple[list[LayerReport], list]] = []
        dropped: list[tuple[list[LayerReport], str]] = []
        breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
        target = model if compiled else torch.compile(model, backend=_explain_backend(options))
        _collecting.append(ran)
        DROPPED_SINKS.append(dropped)
        try:
            with torch.no_grad(), telemetry.record_stats(warn_if_empty=False) as stats:
                target(*args, **kwargs)
        finally:
            _collecting.remove(ran)
            DROPPED_SINKS.remove(dropped)
        graphs: list[list[LayerReport]] = []
        for reports, inputs in ran:
            if not any(g is reports for g in graphs):
                graphs.append([_with_call_params(r, inputs) for r in reports])
        reports = [r for g in graphs for r in g]
        reports += _dropped_sites(dropped, {r.name for r in reports})
        breaks = [
            f"{reason} (x{n - breaks_before.get(reason, 0)})"
            for reason, n in torch._dynamo.utils.counters["graph_break"].items()
            if n > breaks_before.get(reason, 0)
        ]
        return ExplainReport(
            [r for r in reports if r.matched],
            [r for r in reports if not r.matched],
            len(graphs),
            stats.layers,
            breaks,
        )

    return run
