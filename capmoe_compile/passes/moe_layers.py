"""Find MoE layers in a Dynamo FX graph and rewrite them into capmoe ops.

A layer is found from its router (``routers.py``): a top-k over expert scores. Its *expert
region* is every node between that top-k and the first ``[T, H]`` node that all of the
top-k's data must flow through (its post-dominator): dispatch, the experts, the combine.
Inside the region the passes find the selection ``S`` (ids ``[T, k]``) and the gate weights
``W`` (``[T, k]``) the experts consume, the token input ``x`` and the expert parameters.

Nothing is trusted by name. Before a layer is rewritten, the region is cut out of the graph
and run on the call's real inputs and on random selections, and an :class:`ExpertForm` must
reproduce it (``experts.py``). A layer that fails any check is left exactly as written, and
the reason is recorded for ``explain``.

The work is split by concern: ``region`` (the layer's region and graph preparation),
``padding`` (the padding tie), ``verify`` (trials and the expert form), ``rewrite`` (the plan
and the rewrite), ``reports`` (what ``explain`` prints) and ``fx_util`` (FX helpers). This
module runs them over a graph.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .. import pipeline
from . import routers, tokenwise, verify
from .fx_util import ancestors, mutates
from .region import Region, classify_constants, find_region, thread_inplace
from .reports import (
    LayerReport,
    Unmatched,
    layer_name,
    module_path,
    refusal,
    scores_origin,
    site_name,
)
from .rewrite import erase_dead, rewrite_layer

__all__ = ["LayerReport", "Unmatched", "rewrite_moe_layers"]


#: INFO records of what the passes are doing now (no output unless a handler is attached:
#: ``capmoe_compile.tools.progress`` shows them as a status line on a terminal)
progress_log = logging.getLogger("capmoe_compile.progress")


def _capture(gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]) -> dict[fx.Node, Any]:
    """Concrete values of ``wanted`` nodes, by interpreting the graph up to the last one."""
    got: dict[fx.Node, Any] = {}
    remaining = set(wanted)

    class _Stop(Exception):
        pass

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n in remaining:
                got[n] = r
                remaining.discard(n)
                if not remaining:
                    raise _Stop
            return r

    if remaining:
        try:
            with torch.no_grad():
                Recorder(gm).run(*_unshared(gm.graph, example_inputs))
        except _Stop:
            pass
    return got


def _unshared(graph: fx.Graph, example_inputs: list) -> list:
    """The inputs to interpret the graph on: clones of every input an in-place op of the graph
    may write (through any chain of ops), the others as they are.

    Interpreting the graph on the call's own tensors would apply its side effects a second
    time: a static KV cache's position counter would advance at compile time and every later
    step would write one slot off."""
    written: set[fx.Node] = set()
    for n in graph.nodes:
        if mutates(n) and n.args and isinstance(n.args[0], fx.Node):
            written |= {a for a in ancestors([n.args[0]]) if a.op == "placeholder"}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return [
        v.clone() if ph in written and isinstance(v, torch.Tensor) else v
        for ph, v in zip(placeholders, example_inputs, strict=False)
    ]


def rewrite_moe_layers(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | None,
) -> list[LayerReport]:
    """Rewrite every MoE layer of ``gm`` in place; return one report per router-like site.

    ``options`` are the compile's ``options=``; a layer's effective options add the global
    config and per-module overrides (``pipeline.LayerHandle``). The rewritten graph resolves
    them again each call, so configuration changes apply at once. Each verified layer is
    emitted by the first lowering that accepts it (``pipeline.lower``).
    """
    graph = gm.graph
    example_inputs, example, refused = _examples(gm, example_inputs)
    if refused:
        return [LayerReport("<graph>", False, refused)]
    thread_inplace(graph)
    kind = classify_constants(graph, example)
    reports, regions, left = _find_layers(graph, kind)
    progress_log.info(
        "running a graph of %d nodes once (%d MoE layer(s) found)", len(graph.nodes), len(regions)
    )
    probes = [(p, rep, site) for site, rep in left if (p := _site_probe(graph, site, kind))]
    sides = {id(r): _router_side(graph, r, kind) for r, _ in regions}
    wanted = {n for r, _ in regions for n in (r.x, r.ids, r.weights, *r.roots)}
    wanted |= {n for s in sides.values() if not isinstance(s, str) for n in s.wanted()}
    wanted |= {n for p, _, _ in probes for n in (*p.wanted(), *p.outs)}
    values = _capture(gm, example_inputs, wanted)
    values.update({n: v for n, v in example.items() if n in wanted})
    _own_capacity_of_left_sites(probes, values)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    touched: set[fx.Node] = set()  # nodes of rewritten layers that may now be dead
    for i, (region, rep) in enumerate(regions, 1):
        progress_log.info("verifying %s (%d of %d)", rep.name, i, len(regions))
        stage = "reading the values the layer computed on this call"
        try:
            # Whoever changed the parameters (expert parallelism shards them) verified the form
            # before: the layer is no longer the one to run.
            params = [values[p] for p in region.params]
            form = pipeline.known_form(params)
            if form is None:
                stage = "re-running its router on other token sets (token-wise routing)"
                side = sides[id(region)]
                T = values[region.x].shape[0]
                why = side if isinstance(side, str) else tokenwise.dependence(side, values, T)
                if why:
                    raise Unmatched(why)
                stage = "running its experts on trial selections to identify their form"
                form = verify.identify_form(region, values)
        except Exception as e:  # noqa: BLE001 - an analysis failure leaves the layer as written
            rep.reason = refusal(e, stage)
            reports.append(rep)
            continue
        rep.param_inputs = [
            placeholders.index(p) if p.op == "placeholder" else None for p in region.params
        ]
        rewrite_layer(graph, region, rep, form, params, options)
        touched.update(region.removable)
        touched.update(region.expert_nodes)
        reports.append(rep)
    routers.strip_declared(graph)
    erase_dead(graph, touched)
    _check_no_stale_reads(graph, example)
    graph.lint()
    gm.recompile()
    return reports


def _site_probe(graph: fx.Graph, site: routers.TopKSite, kind) -> tokenwise.RouterSide | None:
    try:
        return tokenwise.site_probe(graph, site, kind)
    except Exception:  # noqa: BLE001 - only a better reason for a site left as written
        return None


def _own_capacity_of_left_sites(probes, values: dict[fx.Node, Any]) -> None:
    """A site left as written whose routing is not token-wise (Switch-Transformers' and
    NLLB-MoE's capacity masks) is reported as a layer with its own capacity: that is why it
    must stay as written, whatever else kept its layer from being found."""
    for side, rep, _ in probes:
        try:
            T = values[side.outs[0]].reshape(-1, values[side.outs[0]].shape[-1]).shape[0]
            why = tokenwise.dependence(side, values, T)
        except Exception:  # noqa: BLE001 - the site is left as written either way
            continue
        if why and "enforces its own capacity" in why:  # not "could not be re-run"
            rep.reason = why
    # one layer, several sites (NLLB-MoE's second choice is a top-1 of its own): the layer's
    # capacity is the reason for each of them
    own = {
        module_path(site.node): rep.reason
        for _, rep, site in probes
        if "enforces its own capacity" in rep.reason and module_path(site.node)
    }
    for _, rep, site in probes:
        rep.reason = own.get(module_path(site.node), rep.reason)


def _examples(gm: fx.GraphModule, example_inputs: list) -> tuple[list, dict[fx.Node, Any], str]:
    """The inputs to verify on, each input and constant node's value, and why the graph
    cannot be verified ("" when it can)."""
    # Dynamo passes backed SymInts for symbolic sizes: verify on their hints (no guards).
    example_inputs = [
        getattr(v.node, "hint", None) if isinstance(v, torch.SymInt) else v for v in example_inputs
    ]
    if any(v is None for v in example_inputs):
        return example_inputs, {}, "unbacked symbolic sizes: cannot verify a rewrite"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example = dict(zip(placeholders, example_inputs, strict=False))
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            example[n] = operator.attrgetter(n.target)(gm)
    if any(isinstance(v, torch._subclasses.FakeTensor) for v in example.values()):
        return example_inputs, example, "inputs are fake tensors: cannot verify a rewrite"
    return example_inputs, example, ""


def _find_layers(graph: fx.Graph, kind: dict[fx.Node, str]) -> tuple[list, list, list]:
    """Every top-k site: the reports of sites left as written, the regions of the others, and
    the (site, report) of the sites left as written."""
    reports: list[LayerReport] = []
    regions: list[tuple[Region, LayerReport]] = []
    left: list[tuple[routers.TopKSite, LayerReport]] = []
    for site in routers.find_topk_sites(graph):
        name = site_name(site.node)
        match = routers.match_router(site)
        if match is None:
            why = "top-k over scores no router pattern recognises" + scores_origin(site)
            reports.append(LayerReport(name, False, why, site.num_experts, site.k))
            left.append((site, reports[-1]))
            continue
        try:
            region = find_region(graph, match, kind)
        except Exception as e:  # noqa: BLE001 - an analysis failure leaves the layer as written
            reason = refusal(e, "following the top-k's results to the experts and their output")
            reports.append(LayerReport(name, False, reason, site.num_experts, site.k, match.kind))
            left.append((site, reports[-1]))
            continue
        name = layer_name(site.node, region.out)
        regions.append((region, LayerReport(name, False, "", site.num_experts, site.k, match.kind)))
    return reports, regions, left


def _check_no_stale_reads(graph: fx.Graph, example: dict[fx.Node, Any]) -> None:
    """Raise if the graph still reads expert parameters someone changed after verifying them
    (``pipeline.known_form``: expert parallelism empties the weights it shards). Only a
    rewritten layer may use them; any other reader (a layer the passes left, an expert MLP
    Dynamo compiled in a graph of its own after a graph break) would compute with weights
    that are gone."""
    stale = [
        n.name
        for n in graph.nodes
        if n.op in ("placeholder", "get_attr")
        and n.users
        and isinstance(example.get(n), torch.Tensor)
        and pipeline.known_form([example[n]]) is not None
    ]
    if stale:
        raise RuntimeError(
            f"capmoe: this graph reads expert weights that were sharded or changed after "
            f"verification ({', '.join(stale)}) outside a rewritten MoE layer: the layer's "
            "router and experts must be in one graph the passes rewrite (see "
            "capmoe_compile.explain for graph breaks and the reasons layers were left)"
        )


def _router_side(graph: fx.Graph, region: Region, kind) -> tokenwise.RouterSide | str:
    try:
        return tokenwise.router_side(
            graph,
            region.x,
            region.ids,
            region.weights,
            region.site.rows,
            region.site.num_experts,
            kind,
        )
    except Exception as e:  # noqa: BLE001 - the layer is then left as written, with this reason
        return refusal(e, "cutting its router out of the graph (token-wise routing)")
