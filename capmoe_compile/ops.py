"""The route stage's custom ops. Their eager kernels are the reference semantics.

``capmoe::route`` wraps :func:`capmoe_compile.routing.route_reference`; its fake kernel only
needs the output width, so the op traces with symbolic ``T``.
"""

from __future__ import annotations

import warnings

import torch

from . import telemetry
from .experts import TILE
from .library import custom_op
from .pipeline import layer as _layer
from .routing import output_width, route_reference, route_with_options


@custom_op("capmoe::route")
def route_op(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    capacity_factor: float | None,
    policy: str,
    local_experts: list[int] | None,
    renormalize: bool,
    reroute_rounds: int,
    seed: int,
    min_tokens: int,
    min_capacity: int,
    capacity_align: int,
    capacity_scope: str,
    num_sequences: int,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return route_reference(
        probs,
        topk_ids,
        topk_weights,
        capacity_factor=capacity_factor,
        policy=policy,
        local_experts=local_experts,
        renormalize=renormalize,
        reroute_rounds=reroute_rounds,
        seed=seed,
        min_tokens=min_tokens,
        min_capacity=min_capacity,
        capacity_align=capacity_align,
        capacity_scope=capacity_scope,
        num_sequences=num_sequences,
        valid=valid,
    )


@route_op.register_fake
def _route_fake(
    probs,
    topk_ids,
    topk_weights,
    capacity_factor,
    policy,
    local_experts,
    renormalize,
    reroute_rounds,
    seed,
    min_tokens,
    min_capacity,
    capacity_align,
    capacity_scope,
    num_sequences,
    valid,
):
    T, k = topk_ids.shape
    E = probs.shape[1]
    width = k if capacity_factor is None else output_width(k, E, policy, local_experts)
    ids = topk_ids.new_empty((T, width), dtype=torch.int64)
    return ids, topk_weights.new_empty((T, width))


# ---------------------------------------------------------------------------------------------
# The op the backend puts in front of every rewritten MoE layer.
#
# A compiled graph does not bake the capacity options in: ``capmoe::route_layer`` resolves them
# when it runs (global config < ``options=`` < per-module overrides, cached per config version),
# so changing the configuration takes effect on the next call without a recompile and a stale
# graph is impossible. Only the output width is structural: it is fixed when the graph is
# compiled (k, or k' of ``expanded_drop``), and Dynamo guards it (``pipeline.guard_width``): a
# call whose configuration needs another width recompiles the frame (or reuses the entry
# compiled for that width) before this op runs. A graph compiled without Dynamo's guards (the
# passes run by hand) pads a narrower selection with dropped pairs, which changes nothing, and
# raises where its width is too narrow, instead of computing something else.


@custom_op("capmoe::route_layer")
def route_layer(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    layer: int,
    width: int,
    num_sequences: int,
    attention_mask: torch.Tensor | None,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route one layer call with the options in force now (see :class:`LayerHandle`).

    ``num_sequences`` is B of the [B, S] the rows were flattened from (0: unknown);
    ``attention_mask`` the model's [B, S] mask where the passes could tie it to the rows.

    Returns the new ids and weights, and ``gemm_tile``: a 0-d int64 CPU tensor, the row tile
    the expert GEMMs must use for batch-invariant arithmetic (``lowering/invariant.py``), or 0
    when this call does not need it. It is data, not a graph constant, so switching scopes
    needs no recompile.
    """
    h = _layer(layer)
    opts = h.options(anchor)
    need = h.width(opts)
    if need > width:  # only without Dynamo's guard: see pipeline.guard_width
        raise RuntimeError(
            f"capmoe: layer {h.name} was compiled (outside torch.compile, so without the guard "
            f"that recompiles it) for {width} experts per token, but the configuration now asks "
            f"for {need} (policy={opts['policy']!r}): run the passes again on this graph"
        )
    T, k = topk_ids.shape
    ids = topk_ids.long()
    scope = opts["capacity_scope"]
    check_sequence_scope(opts, num_sequences, h.name)
    valid = None  # capacity off: the layer runs exactly as written, every row counts
    if opts["capacity_factor"] is None:
        out_ids, out_w = ids.clone(), topk_weights.clone()
    else:
        if opts["exclude_padding"]:
            valid = padding_rows(attention_mask, T, num_sequences)
        out_ids, out_w = route_with_options(
            probs,
            ids,
            topk_weights,
            opts,
            capacity_scope=scope,
            num_sequences=max(num_sequences, 1),
            valid=valid,
        )
    if telemetry.is_recording():
        from . import config

        # exempt: a per-module override turned capacity off where config and options= have it on
        exempt = opts["capacity_factor"] is None and (
            config.resolve(h.compile_options)["capacity_factor"] is not None
        )
        telemetry.record(
            h.name, ids, out_ids, h.num_experts, opts, valid, max(num_sequences, 1), exempt
        )
    if need < width:  # pairs with expert E and weight 0 are dropped: they contribute nothing
        pad = width - need
        out_ids = torch.cat([out_ids, out_ids.new_full((T, pad), h.num_experts)], 1)
        out_w = torch.cat([out_w, out_w.new_zeros((T, pad))], 1)
    tile = gemm_tile(opts)
    if tile and probs.device.type != "cpu" and h.name not in _WARNED_TILES:
        _WARNED_TILES.add(h.name)
        warnings.warn(
            f"capmoe: layer {h.name} asks for batch-invariant expert arithmetic "
            f"(capacity_scope='sequence' or batch_invariant=True), which is CPU-only so far: on "
            f"{probs.device.type} its routing is per sequence but its outputs can still differ "
            "in the last bits between batchings",
            stacklevel=2,
        )
    return out_ids, out_w, torch.scalar_tensor(tile, dtype=torch.int64)


_WARNED_TILES: set[str] = set()


def check_sequence_scope(opts: dict, num_sequences: int, name: str) -> None:
    """``capacity_scope="sequence"`` routes each of the B sequences on its own: a layer whose
    [B, S] structure the graph does not show (``num_sequences`` 0) cannot."""
    if opts["capacity_scope"] == "sequence" and num_sequences < 1:
        raise RuntimeError(
            f"capmoe: capacity_scope='sequence' needs the [B, S] structure of layer {name}'s "
            "rows, which the graph does not show (see capmoe_compile.explain)"
        )


def padding_rows(mask: torch.Tensor | None, rows: int, num_sequences: int) -> torch.Tensor | None:
    """The rows that count (``[T]`` bool), or None when all do.

    The passes tie a layer's rows (flattened from [B, S, H]) to the model's attention mask.
    Whether the tie holds is decided here, on every call, from the shapes of that call: the
    mask must be exactly [B, S]. A decode step with a KV cache (mask [B, past + S]) or a call
    whose mask belongs to other rows counts all rows, whatever graph runs it, so the result
    never depends on which sizes Dynamo made symbolic.
    """
    if mask is None or num_sequences < 1 or mask.dim() != 2:
        return None
    if mask.shape[0] != num_sequences or mask.shape[0] * mask.shape[1] != rows:
        return None
    return mask.reshape(-1).bool()


def gemm_tile(opts: dict) -> int:
    """The GEMM row tile resolved options ask for: batch-invariant arithmetic (a fixed tile) for
    ``capacity_scope="sequence"`` (SPEC.md promises a sequence's output independent of its
    batch) and for ``batch_invariant=True``; 0 (the fastest GEMM) otherwise."""
    return TILE if opts["batch_invariant"] or opts["capacity_scope"] == "sequence" else 0


@route_layer.register_fake
def _route_layer_fake(
    probs, topk_ids, topk_weights, layer, width, num_sequences, mask, anchor=None
):
    T = topk_ids.shape[0]
    return (
        topk_ids.new_empty((T, width), dtype=torch.int64),
        topk_weights.new_empty((T, width)),
        torch.empty((), dtype=torch.int64, device="cpu"),
    )
