"""What the passes report for each router-like site (``explain`` prints these), the names
they give layers and sites, and the reason a site is left as written."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re

from torch import fx

from ..experts import ExpertForm
from . import routers

log = logging.getLogger("capmoe_compile")


@dataclasses.dataclass
class LayerReport:
    """What the passes found for one router-like site (``explain`` prints these)."""

    name: str
    matched: bool
    reason: str = ""
    num_experts: int = 0
    top_k: int = 0
    router: str = ""
    dispatch: str = ""
    experts: str = ""
    tokens: int | None = None
    capacity: int | None = None
    padding: str = ""  # how padding rows are treated, or why they cannot be excluded
    lowering: str = ""  # what runs the experts (see _rewrite), or the EP form and why
    options: dict = dataclasses.field(default_factory=dict)
    form: ExpertForm | None = None  # the verified expert form (matched layers)
    # the expert parameters as the compiled call saw them, in ``form.roles`` order
    params: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    # the graph input each of ``params`` is (None: a constant of the graph), so that a later
    # call of the same graph can name its own parameters (``explain``)
    param_inputs: list = dataclasses.field(default_factory=list, repr=False, compare=False)


class Unmatched(Exception):
    """A site the passes will not rewrite; the message is the reason."""


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\._modules\['([^']+)'\]", r".\1", path).strip(".")


def layer_name(site_node: fx.Node, out_node: fx.Node) -> str:
    a, b = module_path(site_node).split("."), module_path(out_node).split(".")
    common = [x for x, y in zip(a, b, strict=False) if x == y]
    n = len(list(itertools.takewhile(lambda p: p[0] == p[1], zip(a, b, strict=False))))
    if ".".join(common[:n]):
        return ".".join(common[:n])
    # The MoE block is the compiled module itself: name it by its class.
    for node in (site_node, out_node):
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            return getattr(cls, "__name__", str(cls))
    return _source_location(site_node)


def site_name(node: fx.Node) -> str:
    """Where a router-like site is, for reports: its module path, else its source line."""
    return module_path(node) or _source_location(node)


def _source_location(node: fx.Node) -> str:
    """``forward (model.py:32)`` for a node of the compiled function or root module itself,
    which has no module path (its source line, from Dynamo's stack trace)."""
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.meta.get("stack_trace") or "")
    if not found:
        return node.name
    file, line, func = found[-1]
    return f"{func} ({file.rsplit('/', 1)[-1]}:{line})"


def scores_origin(site: routers.TopKSite) -> str:
    """What computed the scores a top-k ranked, for the reason a site is left: a router's
    scores come from a softmax or sigmoid over experts (or their logits); an attention
    indexer's or a product-key lookup's from something else, and saying which tells them
    apart."""
    n = routers._skip_value_preserving(site.scores)
    op = getattr(n.target, "__name__", str(n.target)) if n.op != "placeholder" else "an input"
    return f" (the ranked scores [.., {site.num_experts}] come from {op}, k={site.k})"


def refusal(e: Exception, stage: str) -> str:
    """The reason a site is left as written: the passes' own, or which part of the analysis
    did not understand the layer.

    Finding and checking a layer only reads the graph, so a failure there (an op the
    verifier cannot run, a shape it did not expect) leaves the graph untouched: the layer runs
    as written and the failure is reported, not raised into the user's compile. The internal
    exception is logged at debug level (``logging.getLogger("capmoe_compile")``), not shown as
    the reason."""
    if isinstance(e, Unmatched):
        return str(e)
    log.debug("capmoe: analysis failed while %s", stage, exc_info=e)
    what = _failed_op(e)
    return (
        f"the passes did not understand this layer while {stage}"
        + (f" (at {what})" if what else "")
        + ": it runs as written"
    )


def _failed_op(e: Exception) -> str:
    """The graph node or op an analysis failure points at, if it names one."""
    arg = e.args[0] if e.args else None
    if isinstance(arg, fx.Node):  # a value the analysis expected and did not have
        return f"the tensor {arg.name}"
    tb = e.__traceback__
    node = None
    while tb is not None:  # the innermost interpreted FX node, if any
        cand = tb.tb_frame.f_locals.get("n") or tb.tb_frame.f_locals.get("node")
        if isinstance(cand, fx.Node):
            node = cand
        tb = tb.tb_next
    return (
        f"{node.name} ({node.target if node.op != 'call_function' else getattr(node.target, '__name__', node.target)})"
        if node
        else ""
    )
