"""MoE layers the project did not write, built as a new user would, against ``backend="capmoe"``.

For every case (a third-party library's MoE layer at a tiny config, or a hand-written style
that issue 24 names), in fp32 and bf16, with random weights, eval mode, ``T = 48`` tokens and a
router skewed so that expert loads are uneven:

- ``inductor``: ``torch.compile(model, backend="inductor")`` compiles? ``max|compiled - eager|``;
- ``off``: ``backend="capmoe"`` with capacity off: compiles? ``max|compiled - eager|``, and
  whether it is within ``max(2 x inductor's, 1e-5)`` (issue 23's bound);
- ``explain``: ``capmoe_compile.explain(model)(x)``: layers matched, layers left and why;
- ``on``: ``options={"capacity_factor": 1.0, "policy": "score"}``. Where a layer matched and an
  oracle exists, against it: the layer's own router outputs (``P``, ``S``, ``W`` by SPEC.md's
  rules, read off the layer's own modules, not from the passes) through
  ``capmoe_compile.route(P, S, W, capacity_factor=1.0)``, then the layer's own experts (a dropped
  pair keeps its expert id with weight 0). Where a layer enforces its own capacity (DeepSpeed's
  gate), it must be left as written and capacity on must equal eager; the same holds for any
  layer left as written.

Verdicts: ``ok-matched``, ``ok-left``, ``WRONG`` (capmoe differs beyond the bound, or a layer
with its own capacity was rewritten), ``CRASH`` (capmoe fails where Inductor compiles),
``skip`` (library not installed or the layer does not build).

The libraries are optional: each case whose library is missing is recorded as
``skip: not installed``. They live in a second environment (torchtitan, litgpt, deepspeed,
torchtune; see the results file for versions). torchtune's latest release on PyPI (0.6.1) has
no ``torchtune.modules.moe``; the case uses it where the environment has it (from torchtune's
main branch) and skips otherwise.

    python -m benchmarks.external_layers                    # all cases, fp32 and bf16
    python -m benchmarks.external_layers --cases litgpt_llamamoe --dtypes fp32

Each case runs in a subprocess with a timeout (``--timeout``); results are written to
``benchmarks/results/external_layers.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, FFN, NUM_EXPERTS, TOP_K = 32, 64, 8, 2
BATCH, SEQ = 2, 24  # T = 48
GAMMA = 1.0
ON_OPTIONS = {"capacity_factor": GAMMA, "policy": "score"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"
PARTIAL = Path(tempfile.gettempdir()) / "external_layers_partial.jsonl"
LIBRARIES = ("torch", "torchtitan", "litgpt", "deepspeed", "torchtune", "torchao", "triton")


class NotInstalled(Exception):
    pass


@dataclasses.dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    # oracle(gamma) -> (output, pairs dropped); gamma None reproduces eager (its own error is
    # measured and widens the bound). None: no oracle for this case.
    oracle: Callable[[float | None], tuple[torch.Tensor, int]] | None = None
    own_capacity: bool = False  # the layer limits its experts by its own rule (SPEC: left)
    note: str = ""


# ------------------------------------------------------------------------------------------
# helpers


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise NotInstalled(f"not installed ({module}: {e})") from e


def _inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [B, S, H] sharing a common direction ``u`` (so a gate row aligned with
    ``u`` draws more tokens), and ``u``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(HIDDEN, generator=g)
    u = u / u.norm()
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=g) + 1.5 * u
    return x.to(dtype), u


def _skew_(gate_weight: torch.Tensor, u: torch.Tensor) -> None:
    """Skew a gate weight ``[E, H]`` towards the inputs' common direction: expert 0 most."""
    E = gate_weight.shape[0]
    with torch.no_grad():
        ramp = torch.linspace(1.5, -0.5, E, dtype=torch.float32)
        gate_weight.add_((ramp[:, None] * u[None, :]).to(gate_weight))


def _randomize_(model: nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _route(P, ids, W, gamma):
    """The oracle's capacity step: SPEC's assignment from the layer's own ``P``/``S``/``W``;
    a dropped pair keeps its expert id with weight 0. Returns (ids, W, pairs dropped)."""
    import capmoe_compile

    if gamma is None:
        return ids, W, 0
    E = P.shape[-1]
    shape = ids.shape
    P2, ids2, W2 = P.reshape(-1, E), ids.reshape(-1, shape[-1]), W.reshape(-1, shape[-1])
    new_ids, new_w = capmoe_compile.route(P2.float(), ids2, W2, capacity_factor=gamma)
    dropped = new_ids >= E
    new_w = torch.where(dropped, torch.zeros_like(new_w), new_w).to(W.dtype)
    new_ids = torch.where(dropped, ids2, new_ids).to(ids.dtype)
    return new_ids.reshape(shape), new_w.reshape(shape), int(dropped.sum())


def _pairs_out(h, ids, W, expert: Callable[[int, torch.Tensor], torch.Tensor], E: int):
    """``sum_j W[t, j] * expert(ids[t, j])(h[t])``, expert by expert (the oracle's combine)."""
    out = torch.zeros_like(h)
    for e in range(E):
        t, j = torch.where(ids == e)
        if t.numel():
            out.index_add_(0, t, (W[t, j, None] * expert(e, h[t])).to(h.dtype))
    return out


# ------------------------------------------------------------------------------------------
# third-party layers


def build_torchtitan(dtype: torch.dtype, seed: int = 0) -> Case:
    """torchtitan's MoE: TokenChoiceTopKRouter (sigmoid, route_norm, top-2) + GroupedExperts
    (``torch._grouped_mm`` in bf16) through the local token dispatcher, with the
    auxiliary-loss-free expert bias buffer (zeros)."""
    try:
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts as TTGroupedExperts
        from torchtitan.models.common.moe import (
            MoE,
            RoutedExperts,
            TokenChoiceTopKRouter,
        )
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    except ImportError as e:
        raise NotInstalled(f"not installed (torchtitan: {e})") from e
    E, K = NUM_EXPERTS, TOP_K
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=TTGroupedExperts.Config(dim=HIDDEN, hidden_dim=FFN, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=HIDDEN, out_features=E),
            top_k=K,
            score_func="sigmoid",
            route_norm=True,
        ),
    )
    model = cfg.build()
    _randomize_(model, seed)
    x, u = _inputs(seed, dtype)
    _skew_(model.router.gate.weight, u * 2)
    model = model.to(dtype).eval()
    model.expert_bias_E.zero_()  # the buffer the router adds for selection (float32)
    router = model.router
    original = router.forward

    def oracle(gamma):
        dropped = [0]

        def routed(x_BLD, expert_bias_E=None):
            w, ids, scores = original(x_BLD, expert_bias_E)
            # P: the sigmoid scores before the (zero) bias, top-k and renormalisation
            ids2, w2, dropped[0] = _route(scores, ids, w, gamma)
            return w2, ids2, scores

        router.forward = routed
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            del router.forward
        return out, dropped[0]

    return Case(model, x, oracle, note="sigmoid top-2, route_norm, GroupedExperts (grouped_mm)")


def build_litgpt(dtype: torch.dtype, seed: int = 0) -> Case:
    """litgpt's LLaMAMoE (Mixtral style: top-k of raw logits, softmax over the selected,
    ``torch.where`` dispatch over an ``nn.ModuleList`` of LLaMAMLP)."""
    try:
        from litgpt.config import Config
        from litgpt.model import LLaMAMoE
    except ImportError as e:
        raise NotInstalled(f"not installed (litgpt: {e})") from e
    E, K = NUM_EXPERTS, TOP_K
    config = Config(
        n_embd=HIDDEN,
        n_head=4,
        n_layer=1,
        mlp_class_name="LLaMAMoE",
        intermediate_size=FFN,
        moe_intermediate_size=FFN,
        n_expert=E,
        n_expert_per_token=K,
        bias=False,
    )
    model = LLaMAMoE(config)
    _randomize_(model, seed)
    x, u = _inputs(seed, dtype)
    _skew_(model.gate.weight, u * 2)
    model = model.to(dtype).eval()

    def oracle(gamma):
        with torch.no_grad():
            h = x.reshape(-1, HIDDEN)
            logits = model.gate(h)
            top, ids = torch.topk(logits, K)
            W = top.softmax(dim=1, dtype=torch.float).to(dtype=h.dtype)
            P = logits.float().softmax(-1)  # SPEC: top-k of raw logits -> softmax over all
            ids, W, dropped = _route(P, ids, W, gamma)
            out = _pairs_out(h, ids, W, lambda e, r: model.experts[e](r), E)
        return out.view_as(x), dropped

    return Case(model, x, oracle, note="top-2 of logits, softmax over selected, ModuleList")


_DS_READY = False


def _deepspeed_init() -> Any:
    global _DS_READY
    deepspeed = _require("deepspeed")
    if not _DS_READY:
        import torch.distributed as dist

        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
            )
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        _DS_READY = True
    return deepspeed


class _DSWrap(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)[0]


def _build_deepspeed(dtype, seed, k, eval_capacity_factor, min_capacity) -> Case:
    deepspeed = _deepspeed_init()
    from deepspeed.moe.layer import MoE as DSMoE

    expert = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
    moe = DSMoE(
        hidden_size=HIDDEN,
        expert=expert,
        num_experts=NUM_EXPERTS,
        ep_size=1,
        k=k,
        capacity_factor=1.0,
        eval_capacity_factor=eval_capacity_factor,
        min_capacity=min_capacity,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    model = _DSWrap(moe)
    _randomize_(model, seed)
    x, u = _inputs(seed, dtype)
    _skew_(moe.deepspeed_moe.gate.wg.weight, u * 2)
    model = model.to(dtype).eval()
    del deepspeed
    return Case(model, x, None, own_capacity=True)


def build_deepspeed_nonbinding(dtype: torch.dtype, seed: int = 0) -> Case:
    """DeepSpeed MoE, top-2, eval capacity factor = E (the capacity never binds)."""
    c = _build_deepspeed(dtype, seed, k=2, eval_capacity_factor=float(NUM_EXPERTS), min_capacity=4)
    c.note = "top-2, eval_capacity_factor=E (never binds), ep_size=1 on gloo"
    return c


def build_deepspeed_binding(dtype: torch.dtype, seed: int = 0) -> Case:
    """DeepSpeed MoE, top-1, eval capacity factor 1.0, min_capacity 0 (binds: tokens dropped)."""
    c = _build_deepspeed(dtype, seed, k=1, eval_capacity_factor=1.0, min_capacity=0)
    c.note = "top-1, eval_capacity_factor=1.0 (binds), ep_size=1 on gloo"
    return c


def build_torchtune(dtype: torch.dtype, seed: int = 0) -> Case:
    """torchtune's MoE (Llama-4 style): sigmoid TokenChoiceTopKRouter, scores scale the expert
    *input*, GroupedExperts split by ``counts.tolist()``, and a shared FeedForward expert."""
    try:
        from torchtune.modules import FeedForward
        from torchtune.modules.moe import GroupedExperts, MoE, TokenChoiceTopKRouter
    except ImportError as e:
        raise NotInstalled(f"not installed (torchtune.modules.moe: {e})") from e
    E, K = NUM_EXPERTS, TOP_K
    gate = nn.Linear(HIDDEN, E, bias=False)

    class CPURouter(TokenChoiceTopKRouter):
        """torchtune's router with one change: its ``torch.histc`` over int64 expert ids fails
        on CPU ("histogram_cpu" not implemented for 'Long'); ``bincount`` instead."""

        def forward(self, x):
            scores = torch.sigmoid(self.gate(x).to(torch.float32)).to(x.dtype)
            top, ids = torch.topk(scores, k=self.experts_per_token, dim=1)
            self.selected_experts_indices = ids
            counts = torch.bincount(ids.view(-1), minlength=self.num_experts)
            order = torch.argsort(ids.view(-1), stable=True)
            return top.view(-1)[order], order // self.experts_per_token, counts

    router = TokenChoiceTopKRouter(gate=gate, dim=HIDDEN, num_experts=E, experts_per_token=K)
    note = "sigmoid top-2, input scaled, split(tolist), shared expert"
    try:
        with torch.no_grad():
            router(torch.randn(4, HIDDEN))
    except NotImplementedError:
        router = CPURouter(gate=gate, dim=HIDDEN, num_experts=E, experts_per_token=K)
        note += "; router's histc(int64) fails on CPU: bincount instead"
    experts = GroupedExperts(dim=HIDDEN, hidden_dim=FFN, num_experts=E)
    shared = FeedForward(
        gate_proj=nn.Linear(HIDDEN, FFN, bias=False),
        down_proj=nn.Linear(FFN, HIDDEN, bias=False),
        up_proj=nn.Linear(HIDDEN, FFN, bias=False),
    )
    model = MoE(experts=experts, router=router, shared_expert=shared)
    _randomize_(model, seed)
    x, u = _inputs(seed, dtype)
    _skew_(gate.weight, u * 2)
    model = model.to(dtype).eval()

    def oracle(gamma):
        # torchtune's router, written again with the capacity step between its top-k and its
        # grouping (P: the sigmoid scores; W: the top-k scores; no renormalisation)
        dropped = [0]

        def routed(h):
            scores = torch.sigmoid(router.gate(h).to(torch.float32)).to(h.dtype)
            top, ids = torch.topk(scores, k=K, dim=1)
            ids, top, dropped[0] = _route(scores, ids, top, gamma)
            counts = torch.bincount(ids.view(-1), minlength=E)
            order = torch.argsort(ids.view(-1), stable=True)
            return top.view(-1)[order], order // K, counts

        router.forward = routed
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            del router.forward
        return out, dropped[0]

    return Case(model, x, oracle, note=note)


# ------------------------------------------------------------------------------------------
# hand-written styles (issue 24's list), this project's own code


class _Hand(nn.Module):
    E, K = NUM_EXPERTS, TOP_K

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, self.E, bias=False)
        self.route_fn: Callable | None = None  # the oracle's hook (None when compiled)

    def _route(self, P, ids, W):
        if self.route_fn is None:
            return ids, W
        return self.route_fn(P, ids, W)


def _mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(HIDDEN, FFN, bias=bias), nn.GELU(), nn.Linear(FFN, HIDDEN, bias=bias)
    )


class SortSlice(_Hand):
    """``torch.sort`` of the raw logits, descending, and a slice of the first k; softmax over
    the slice; ModuleList experts with biases, dense weighted combine. P = softmax(logits)."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(_mlp() for _ in range(self.E))

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        logits = self.gate(h)
        vals, order = torch.sort(logits, dim=-1, descending=True)
        ids = order[:, : self.K]
        w = F.softmax(vals[:, : self.K].float(), dim=-1).to(h.dtype)
        ids, w = self._route(F.softmax(logits.float(), dim=-1), ids, w)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            we = (w * (ids == e)).sum(-1, keepdim=True)
            out = out + we * expert(h)
        return out.view(B, S, H)


class ArgsortProbs(_Hand):
    """Softmax probabilities, ``argsort`` descending and a slice, weights gathered and
    renormalised; per-expert gather of the selected rows and ``index_add_``. P = the probs."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(_mlp(bias=False) for _ in range(self.E))

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        probs = self.gate(h).softmax(dim=-1)
        ids = probs.argsort(dim=-1, descending=True)[:, : self.K]
        w = probs.gather(1, ids)
        w = w / w.sum(dim=-1, keepdim=True)
        ids, w = self._route(probs, ids, w)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            t, j = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, t, w[t, j, None] * expert(h[t]))
        return out.view(B, S, H)


class TemperatureTopK(_Hand):
    """Temperature-scaled logits, top-k, softmax *after* the top-k over the selected; stacked
    expert weights gathered per pair (SwiGLU). P = softmax(logits / tau) over all experts."""

    tau = 0.7

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(self.E, FFN, HIDDEN))
        self.w3 = nn.Parameter(torch.empty(self.E, FFN, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(self.E, HIDDEN, FFN))

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        logits = self.gate(h) / self.tau
        top, ids = logits.topk(self.K, dim=-1)
        w = top.softmax(dim=-1)
        ids, w = self._route(logits.float().softmax(-1), ids, w)
        hk = h[:, None, :].expand(-1, self.K, -1)  # [T, k, H]
        a = torch.einsum("tkh,tkfh->tkf", hk, self.w1[ids])
        b = torch.einsum("tkh,tkfh->tkf", hk, self.w3[ids])
        y = torch.einsum("tkf,tkhf->tkh", F.silu(a) * b, self.w2[ids])
        return (w[..., None] * y).sum(1).view(B, S, H)


class ArgmaxMask(_Hand):
    """Top-1 by ``argmax`` of the softmax, weight = the max probability; dispatch assigns
    through a boolean mask (``out[mask] = expert(h[mask]) * w[mask]``). P = the probs."""

    K = 1

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(_mlp() for _ in range(self.E))

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        probs = F.softmax(self.gate(h), dim=-1)
        ids = probs.argmax(dim=-1, keepdim=True)
        w = probs.gather(1, ids)
        ids, w = self._route(probs, ids, w)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            mask = ids[:, 0] == e
            out[mask] = expert(h[mask]) * w[mask]
        return out.view(B, S, H)


def _hand(cls: type[_Hand]) -> Callable[[torch.dtype, int], Case]:
    def build(dtype: torch.dtype, seed: int = 0) -> Case:
        model = cls()
        _randomize_(model, seed)
        x, u = _inputs(seed, dtype)
        _skew_(model.gate.weight, u * 2)
        model = model.to(dtype).eval()

        def oracle(gamma):
            dropped = [0]

            def fn(P, ids, W):
                ids, W, dropped[0] = _route(P, ids, W, gamma)
                return ids, W

            model.route_fn = fn
            try:
                with torch.no_grad():
                    out = model(x)
            finally:
                model.route_fn = None
            return out, dropped[0]

        return Case(model, x, oracle, note=" ".join((cls.__doc__ or "").split()).split(". ")[0])

    build.__doc__ = cls.__doc__
    return build


CASES: dict[str, Callable[..., Case]] = {
    "torchtitan_moe": build_torchtitan,
    "litgpt_llamamoe": build_litgpt,
    "deepspeed_nonbinding": build_deepspeed_nonbinding,
    "deepspeed_binding": build_deepspeed_binding,
    "torchtune_moe_shared": build_torchtune,
    "hand_sort_slice": _hand(SortSlice),
    "hand_argsort_probs": _hand(ArgsortProbs),
    "hand_temperature_topk": _hand(TemperatureTopK),
    "hand_argmax_mask": _hand(ArgmaxMask),
}


# ------------------------------------------------------------------------------------------
# one case


def _short(e: BaseException, limit: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _compile_run(model, x, backend, options=None) -> tuple[torch.Tensor | None, str | None]:
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend, options=options)
        with torch.no_grad():
            return compiled(x), None
    except Exception as e:  # noqa: BLE001 - recorded
        return None, _short(e)
    finally:
        torch._dynamo.reset()


def run_case(name: str, dtype_name: str, seed: int = 0) -> dict[str, Any]:
    import capmoe_compile

    dtype = DTYPES[dtype_name]
    rec: dict[str, Any] = {"case": name, "dtype": dtype_name}
    try:
        case = CASES[name](dtype, seed)
    except NotInstalled as e:
        return rec | {"verdict": "skip", "why": str(e)}
    except Exception as e:  # noqa: BLE001
        return rec | {"verdict": "skip", "why": f"does not build: {_short(e)}"}
    model, x = case.model, case.x
    rec |= {"note": case.note, "own_capacity": case.own_capacity, "T": x.numel() // x.shape[-1]}
    try:
        with torch.no_grad():
            eager = model(x)
            eager2 = model(x)
    except Exception as e:  # noqa: BLE001
        return rec | {"verdict": "skip", "why": f"eager fails: {_short(e)}"}
    rec["eager_deterministic"] = bool(torch.equal(eager, eager2))

    t0 = time.perf_counter()
    ind, err = _compile_run(model, x, "inductor")
    rec["inductor"] = {"ok": err is None, "error": err, "s": round(time.perf_counter() - t0, 1)}
    if ind is not None:
        rec["inductor"]["maxdiff"] = _maxdiff(ind, eager)
    ind_diff = rec["inductor"].get("maxdiff")
    bound = (
        max(2 * ind_diff, 1e-5)
        if ind_diff is not None
        else (1e-5 if dtype_name == "fp32" else 2e-2)
    )
    rec["bound"] = bound

    t0 = time.perf_counter()
    off, err = _compile_run(model, x, "capmoe")
    rec["off"] = {"ok": err is None, "error": err, "s": round(time.perf_counter() - t0, 1)}
    if off is not None:
        d = _maxdiff(off, eager)
        rec["off"] |= {"maxdiff": d, "within": d <= bound}

    try:
        torch._dynamo.reset()
        report = capmoe_compile.explain(model)(x)
        rec["explain"] = {
            "ok": True,
            "matched": [
                {"name": r.name, "router": r.router, "dispatch": r.dispatch, "experts": r.experts}
                for r in report.layers
            ],
            "left": [{"name": r.name, "reason": r.reason} for r in report.unmatched],
            "graphs": report.graphs,
            "graph_breaks": report.graph_breaks,
        }
    except Exception as e:  # noqa: BLE001
        rec["explain"] = {"ok": False, "error": _short(e), "matched": [], "left": []}
    finally:
        torch._dynamo.reset()
    matched = bool(rec["explain"]["matched"])

    t0 = time.perf_counter()
    on, err = _compile_run(model, x, "capmoe", ON_OPTIONS)
    rec["on"] = {"ok": err is None, "error": err, "s": round(time.perf_counter() - t0, 1)}
    if on is not None:
        rec["on"]["vs_eager"] = _maxdiff(on, eager)
        if case.oracle is not None:
            try:
                base, _ = case.oracle(None)
                want, dropped = case.oracle(GAMMA)
                own = _maxdiff(base, eager)  # the oracle's own error at capacity off
                on_bound = max(bound, 2 * own, 1e-5)
                d = _maxdiff(on, want)
                rec["on"] |= {
                    "oracle_off_error": own,
                    "oracle_dropped_pairs": dropped,
                    "vs_oracle": d,
                    "bound": on_bound,
                    "within": d <= on_bound,
                }
            except Exception as e:  # noqa: BLE001
                rec["on"]["oracle_error"] = _short(e)
    rec["verdict"], rec["why"] = verdict(rec, case, matched)
    return rec


def verdict(rec: dict[str, Any], case: Case, matched: bool) -> tuple[str, str]:
    ind_ok = rec["inductor"]["ok"]
    off, on, ex = rec["off"], rec["on"], rec["explain"]
    if not off["ok"]:
        if ind_ok:
            return "CRASH", f"capacity off: {off['error']}"
        return "skip", f"inductor and capmoe both fail: {off['error']}"
    if not off["within"]:
        return (
            "WRONG",
            f"capacity off differs from eager by {off['maxdiff']:.3g} > {rec['bound']:.3g}",
        )
    if not ex["ok"]:
        return "CRASH", f"explain: {ex['error']}"
    if not on["ok"]:
        return ("CRASH" if ind_ok else "skip"), f"capacity on: {on['error']}"
    reasons = (
        "; ".join(f"{r['name']}: {r['reason']}" for r in ex["left"]) or "no router site listed"
    )
    if case.own_capacity:
        if matched:
            return "WRONG", "a layer with its own capacity was rewritten"
        if on["vs_eager"] > rec["bound"]:
            return "WRONG", f"left, but capacity on differs from eager by {on['vs_eager']:.3g}"
        return "ok-left", reasons
    if not matched:
        if on["vs_eager"] > rec["bound"]:
            return "WRONG", f"left, but capacity on differs from eager by {on['vs_eager']:.3g}"
        return "ok-left", reasons
    if "within" not in on:
        return "ok-matched", f"no oracle ({on.get('oracle_error', 'none for this layer')})"
    if not on["within"]:
        return (
            "WRONG",
            f"capacity on differs from the oracle by {on['vs_oracle']:.3g} > {on['bound']:.3g}",
        )
    return "ok-matched", f"capacity on == oracle ({on['oracle_dropped_pairs']} pairs dropped)"


# ------------------------------------------------------------------------------------------
# driver


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    with contextlib.suppress(ImportError):
        import torchtune.modules.moe  # noqa: F401

        out["torchtune.modules.moe"] = "present (not in the PyPI release; from torchtune main)"
    return out


def _fmt(v: Any, spec: str = ".2g") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | dtype | inductor | capmoe off | off within | explain | on | verdict | why |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        if "inductor" not in r:
            lines.append(
                f"| {r['case']} | {r['dtype']} | - | - | - | - | - | {r['verdict']} | {r['why']} |"
            )
            continue
        ind = f"ok {_fmt(r['inductor'].get('maxdiff'))}" if r["inductor"]["ok"] else "FAIL"
        off = f"ok {_fmt(r['off'].get('maxdiff'))}" if r["off"]["ok"] else "FAIL"
        within = {True: "yes", False: "NO"}.get(r["off"].get("within"), "-")
        ex = r["explain"]
        exs = f"{len(ex['matched'])} matched / {len(ex['left'])} left" if ex["ok"] else "FAIL"
        on = r["on"]
        if not on["ok"]:
            ons = "FAIL"
        elif "vs_oracle" in on:
            ons = f"oracle {_fmt(on['vs_oracle'])} ({on['oracle_dropped_pairs']} dropped)"
        else:
            ons = f"eager {_fmt(on['vs_eager'])}"
        why = r["why"].replace("|", "/")
        lines.append(
            f"| {r['case']} | {r['dtype']} | {ind} | {off} | {within} | {exs} | {ons} | "
            f"**{r['verdict']}** | {why} |"
        )
    return "\n".join(lines)


def _child(name: str, dtype: str, out: str) -> None:
    torch.set_num_threads(1)
    rec = run_case(name, dtype)
    Path(out).write_text(json.dumps(rec, default=str))
    with open(PARTIAL, "a") as f:  # every finished case, also for an interrupted run
        f.write(json.dumps(rec, default=str) + "\n")


def _spawn(name: str, dtype: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rec.json"
        cmd = [sys.executable, "-m", "benchmarks.external_layers", "--child", name, dtype, str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cwd = Path(__file__).resolve().parent.parent
        try:
            p = subprocess.run(
                cmd, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            return {
                "case": name,
                "dtype": dtype,
                "verdict": "skip",
                "why": f"timeout ({timeout:.0f} s)",
            }
        if out.exists():
            return json.loads(out.read_text())
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
        return {
            "case": name,
            "dtype": dtype,
            "verdict": "CRASH",
            "why": f"process died rc={p.returncode}: {tail}",
        }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(*argv[1:4])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(RESULTS / "external_layers"))
    ap.add_argument("--fresh", action="store_true", help="start a new record of finished cases")
    ap.add_argument("--from-partial", action="store_true", help="write the finished cases only")
    args = ap.parse_args(argv)
    from benchmarks.common import loadavg_end, machine

    meta = machine()
    meta |= {
        "command": "python -m benchmarks.external_layers " + " ".join(argv),
        "versions": versions(),
        "T": BATCH * SEQ,
        "config": {"H": HIDDEN, "F": FFN, "E": NUM_EXPERTS, "k": TOP_K, "on": ON_OPTIONS},
    }
    with contextlib.suppress(Exception):
        meta["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    rows = []
    if args.from_partial:  # the cases an interrupted run finished (its children's records)
        seen = {}
        for line in PARTIAL.read_text().splitlines():
            rec = json.loads(line)
            seen[(rec["case"], rec["dtype"])] = rec
        wanted = [(n, d) for n in args.cases.split(",") for d in args.dtypes.split(",")]
        rows = [seen[key] for key in wanted if key in seen]
        meta["command"] += "  (rows from the children's records of the run with --fresh)"
    else:
        if args.fresh:
            PARTIAL.unlink(missing_ok=True)
        for name in args.cases.split(","):
            for dt in args.dtypes.split(","):
                t0 = time.perf_counter()
                rec = _spawn(name, dt, args.timeout)
                rec["wall_s"] = round(time.perf_counter() - t0, 1)
                rows.append(rec)
                print(f"{name:<24} {dt:<5} {rec['verdict']:<11} {rec['why'][:110]}", flush=True)
    write(rows, loadavg_end(meta), Path(args.out))


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    md = (
        '# External MoE layers under backend="capmoe"\n\n'
        f"Command: `{meta['command']}`  \nDate: {meta['date']}  \nCommit: {meta.get('commit')}  \n"
        f"CPU: {meta['cpu']} (ISA {meta['cpu_capability']}), torch threads {meta['torch_threads']}  \n"
        f"Versions: {json.dumps(meta['versions'])}  \n"
        f"Config: H={HIDDEN} F={FFN} E={NUM_EXPERTS} k={TOP_K} T={BATCH * SEQ}; capacity on = {ON_OPTIONS}  \n"
        f"Verdicts: {json.dumps(counts)}\n\n"
        "Columns: max|compiled - eager| for inductor and capmoe (capacity off); 'off within' = "
        "capmoe's within max(2 x inductor's, 1e-5); 'on' = max|capacity on - oracle| (pairs the "
        "oracle dropped), or max|capacity on - eager| where the layer is left or has no oracle.\n\n"
        + table(rows)
        + "\n"
    )
    print()
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)
    )
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
