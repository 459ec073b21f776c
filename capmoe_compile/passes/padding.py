"""The padding tie: which ``[B, S, H]`` tensor a layer's rows were flattened from, and which
2-D attention mask ``capmoe::route_layer`` may use to exclude padding rows."""

from __future__ import annotations

import re

import torch
from torch import fx

from .fx_util import hint, val
from .routers import known_equal

_VIEWS = {"view", "reshape", "contiguous", "to", "float", "type_as"}


def _input_name(node: fx.Node) -> str:
    """The name a user knows a graph input by: ``attention_mask``, not Dynamo's placeholder
    ``l_kwargs_attention_mask_`` (the last key or attribute of the input's source)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    text = getattr(source, "name", None)
    if isinstance(text, str):
        m = re.search(r"\[['\"]([^'\"]+)['\"]\]$|\.(\w+)$", text)
        if m:
            return m.group(1) or m.group(2)
    return re.sub(r"^[lL]_(kwargs_|args_)?", "", node.name).rstrip("_") or node.name


def sequence_tie(
    graph: fx.Graph, x: fx.Node, layer_path: str
) -> tuple[fx.Node | None, fx.Node | None, str]:
    """The [B, S, H] tensor the layer's rows were flattened from, and the model's 2-D attention
    mask to tie them to. Returns (seq_node, mask_node, explanation).

    The tie is a relation checked on every call, not a fact proven at compile time:
    ``capmoe::route_layer`` excludes padding rows only when the mask's shape equals the rows'
    [B, S] on that call (:func:`capmoe_compile.ops.padding_rows`). So every graph Dynamo builds
    for a model treats padding the same way, whether its sizes are static, duck-sized or
    separate symbols after an automatic-dynamic recompile (where ``attention_mask`` and the
    hidden states get different batch symbols that no compile-time proof can equate).
    Here the mask is only chosen: the 2-D ``*attention_mask*`` input whose shape equals [B, S]
    in the call being compiled. In an encoder-decoder graph, layers under a ``decoder`` module
    only take ``decoder_attention_mask`` and the others only a mask without ``decoder_``.
    """
    T = val(x).shape[0]
    node = x
    seq = None
    for _ in range(8):
        v = val(node)
        if isinstance(v, torch.Tensor) and v.dim() == 3 and known_equal(v.shape[0] * v.shape[1], T):
            seq = node
            break
        if node.op == "call_method" and node.target in _VIEWS and node.args:
            node = node.args[0]
        else:
            break
    masks = [
        ph
        for ph in graph.find_nodes(op="placeholder")
        if "attention_mask" in ph.name
        and isinstance(val(ph), torch.Tensor)
        and val(ph).dim() == 2
        and not any(w in ph.name for w in ("encoder", "cross", "head"))
    ]
    if any("decoder_" in ph.name for ph in graph.find_nodes(op="placeholder")):
        in_decoder = "decoder" in layer_path.split(".")[0:3] or ".decoder" in layer_path
        masks = [m for m in masks if ("decoder_" in m.name) == in_decoder]
    if seq is None:
        why = "rows are not a reshape of a [B, S, H] tensor: all rows count"
        return (
            None,
            None,
            why
            + (f" (the graph has {_input_name(masks[0])}, but it cannot be tied)" if masks else ""),
        )
    B, S = (hint(d) for d in val(seq).shape[:2])
    fits = [m for m in masks if tuple(hint(d) for d in val(m).shape) == (B, S)]
    if len(fits) > 1:
        names = ", ".join(_input_name(m) for m in fits)
        return seq, None, f"several attention masks fit the rows ({names}): all rows count"
    if fits:
        where = _input_name(fits[0])
        return seq, fits[0], f"padding excluded where {where} is [B, S] (checked per call)"
    return seq, None, "no 2-D attention_mask input of shape [B, S]: all rows count"
