"""Calibration's forward passes: one pass over the batches, its loss and per-layer loads
(:func:`_run`), and the model helpers the search configures layers through. The search and the
model speedup it optimises: :mod:`capmoe_compile.calibrate`'s docstring."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import module_config
from .telemetry import record_stats


def model_speedup(max_before: Mapping[str, float], max_after: Mapping[str, float]) -> float:
    """The model-level modeled EP speedup: ``sum(max_before) / sum(max_after)`` over layers
    (each value already summed over the layer's calls). See the module docstring."""
    after = sum(max_after.values())
    return sum(max_before.values()) / after if after else 1.0


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    root = _unwrap(model)
    try:
        module = root.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or next(module.parameters(), None) is None:
        layers = sorted(
            n for n, m in root.named_modules() if n.endswith(("mlp", "moe", "block_sparse_moe"))
        )
        hint = f" (candidates: {', '.join(layers[:8])})" if layers else ""
        raise ValueError(f"calibration names layer {name!r}, not a module of the model{hint}")
    return module


@contextlib.contextmanager
def _own_overrides(model: nn.Module):
    """Clear the per-instance overrides of ``model``'s submodules for the block, restore them
    after (the search configures layers one at a time)."""
    saved = {}
    for _, mod in _unwrap(model).named_modules():
        opts = module_config._by_instance.get(mod)
        if opts:
            saved[mod] = dict(opts)
            module_config.clear(mod)
    try:
        yield
    finally:
        for _, mod in _unwrap(model).named_modules():
            module_config.clear(mod)
        for mod, opts in saved.items():
            module_config.configure(mod, **opts)


@dataclass
class _Pass:
    loss: float  # nats per scored token
    tokens: int
    max_after: dict[str, int]  # per layer, summed over calls
    max_before: dict[str, int]
    calls: dict[str, list[list[int]]]  # per layer, per call: loads before (baseline only)
    tokens_per_call: int


def _as_inputs(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}, batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        mask = batch.get("attention_mask")
        return dict(batch), batch["input_ids"], mask
    raise ValueError("calibration batches are input-id tensors [B, S] or dicts with 'input_ids'")


@torch.no_grad()
def _run(
    compiled,
    batches: Sequence[Any],
    keep_calls: bool = False,
    tick: Callable[[int, int], None] | None = None,
) -> _Pass:
    nll, count = 0.0, 0
    max_before: dict[str, int] = {}
    max_after: dict[str, int] = {}
    calls: dict[str, list[list[int]]] = {}
    tokens_per_call = 0
    for i, batch in enumerate(batches, 1):
        if tick is not None:
            tick(i, len(batches))
        inputs, ids, mask = _as_inputs(batch)
        with record_stats() as st:
            # positional for plain ids: the same call signature as ``compiled(ids)`` elsewhere,
            # so Dynamo does not compile a second graph for keyword input
            logits = (
                compiled(ids) if isinstance(batch, torch.Tensor) else compiled(**inputs)
            ).logits
        logits = logits[:, :-1].float()
        target = ids[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        if mask is not None:
            keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).bool()
            losses = losses[keep]
        nll += float(losses.double().sum())
        count += losses.numel()
        for s in st.layers:
            max_before[s.name] = max_before.get(s.name, 0) + int(s.loads_before.max())
            max_after[s.name] = max_after.get(s.name, 0) + int(s.loads_after.max())
            tokens_per_call = max(tokens_per_call, s.tokens)
            if keep_calls:
                calls.setdefault(s.name, []).append([s.tokens, *s.loads_before.tolist()])
    if not count:
        raise ValueError("calibration batches hold no scored tokens")
    return _Pass(nll / count, count, max_after, max_before, calls, tokens_per_call)


def _changes_nothing(calls: list[list[int]], gamma: float, top_k: int) -> bool:
    """Whether capacity ``gamma`` leaves every recorded call of a layer as written: its
    capacity is at least the call's largest load (SPEC.md invariant 2; the global
    ``min_capacity`` / ``capacity_align`` only raise C)."""
    for row in calls:
        tokens, loads = row[0], row[1:]
        cap = max(1, math.ceil(gamma * tokens * top_k / len(loads)))
        if max(loads) > cap:
            return False
    return True
