"""Serving fixtures shared by ``tests/test_generate.py`` and ``benchmarks/serving_graphs.py``:
left-padded prompt batches, greedy ``generate``, and an eager capacity oracle.

The oracle is an eager copy of a zoo model whose routers' outputs are replaced, through
forward hooks, by :func:`capmoe_compile.route` applied to the router's own selection: SPEC.md's
capacity with padding rows excluded in a prefill, and the experts run by transformers' ``eager``
loop, which skips the dropped pairs' sentinel id. It shares the routing reference with the
backend, not the graph rewrite, the lowering or the bookkeeping that the compiled model runs.
"""

from __future__ import annotations

import copy

import torch

import capmoe_compile as cc
from capmoe_compile.testing import zoo


def left_padded(lengths, seed=0, vocab=256, width=None):
    """input_ids and attention_mask [B, width or max(lengths)] of random prompts (ids in
    [3, vocab)), left padded with 0."""
    B, S = len(lengths), width or max(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths):
        ids[b, S - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, S - n :] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens):
    """(sequences, logits [new_tokens, B, V]) of a greedy ``generate`` of exactly
    ``new_tokens`` tokens."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


class CapacityOracle:
    """An eager copy of ``model`` that applies SPEC.md's capacity through forward hooks.

    A pre-hook on the model keeps the call's ``input_ids`` and ``attention_mask``; a hook on
    every router replaces ``(logits, weights, ids)`` by ``capmoe_compile.route`` of the model's
    own selection with ``options``. The rows of a call are padding where the mask covers exactly
    the call's tokens (a prefill) and is 0; a decode step's mask also covers the cached tokens,
    and all of its rows count. ``calls`` records what each router call computed."""

    def __init__(self, model, **options):
        self.model = copy.deepcopy(model)
        self.model.set_experts_implementation("eager")  # its loop skips the sentinel id E
        self.options = options
        self.calls: list[dict] = []
        self._call: dict = {}
        self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        for layer in zoo.moe_layers(self.model):
            layer.router.register_forward_hook(self._route)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._call = {"shape": tuple(ids.shape), "mask": kwargs.get("attention_mask")}

    def _route(self, router, args, output):
        logits, weights, ids = output
        E = logits.shape[-1]
        B, S = self._call["shape"]
        mask = self._call["mask"]
        valid = None
        if mask is not None and tuple(mask.shape) == (B, S):
            valid = mask.reshape(-1).bool()
        probs = torch.softmax(logits.float(), dim=-1)
        new_ids, new_w = cc.route(probs, ids, weights, num_sequences=B, valid=valid, **self.options)
        rows = torch.ones(ids.shape[0], dtype=torch.bool) if valid is None else valid
        count = lambda x: torch.bincount(x[rows].reshape(-1), minlength=E + 1)[:E]  # noqa: E731
        self.calls.append(
            {
                "phase": "decode" if S == 1 else "prefill",
                "tokens": int(rows.sum()),
                "before": count(ids.long()),
                "after": count(new_ids.long()),
            }
        )
        return logits, new_w.to(weights.dtype), new_ids.to(ids.dtype)
