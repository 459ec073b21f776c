"""Coverage of MoE layers the project did not write: third-party libraries installed from the
package registry at pinned releases (``benchmarks/third_party-requirements.txt``), each layer
built at a tiny config as its library documents, and run against ``backend="capmoe"``.

This runs in a second environment (the libraries pull in dependencies the main one does not
have); a library that is absent is recorded as "not installed", one that installs but cannot
run on a CPU-only torch as "does not run on CPU", with the reason (:data:`NOT_RUNNABLE`).

For every case, fp32, eval mode, ``T = 48`` tokens (``[2, 24, H]``), ``H = 32``, ``E = 8``:

- ``inductor``: ``torch.compile(backend="inductor")``, ``max|compiled - eager|``;
- ``off``: ``backend="capmoe"``, capacity off: ``max|compiled - eager|`` within
  ``max(2 x inductor's, 1e-5 x scale)`` ("as close as Inductor");
- ``explain``: ``capmoe_compile.explain(model)(x)``: layers matched, sites left and why;
- ``on``: ``options={"capacity_factor": 0.5, "policy": "score"}``. A matched layer must equal
  the oracle: the layer's own router outputs (P, S, W by SPEC.md, read off the library's own
  router, never from the passes) through ``capmoe_compile.route``, then the library's own
  experts and combine with every dropped pair at weight 0; the oracle must drop pairs (it is
  checked to reproduce eager at capacity off). A layer left as written must give eager.

Verdicts (one per case):

- ``matched``: rewritten, capacity off == eager, capacity on == oracle;
- ``left-correct``: left as written, and it must be: the case's library enforces a capacity of
  its own (SPEC.md, "Where capacity applies"), and the passes' reason says so ("own capacity");
- ``left-gap``: a dropless, token-wise layer SPEC allows rewriting, left as written (not wrong:
  capacity on == eager; a coverage gap);
- ``left-wrong-reason``: a layer that must be left, left for some other reason;
- ``WRONG``: capacity off beyond the bound, capacity on != oracle (or != eager where left), or
  a layer with its own capacity rewritten;
- ``CRASH``: capmoe fails where Inductor compiles.

The headline, "matched or correctly left", is (matched + left-correct) over the cases that ran.

    /tmp/ext/bin/python -m benchmarks.third_party                 # all, results/coverage_third_party.{json,md}
    /tmp/ext/bin/python -m benchmarks.third_party --cases litgpt_llamamoe

Each case runs in its own subprocess (``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HIDDEN, FFN, E, K = 32, 64, 8, 2
BATCH, SEQ = 2, 24
GAMMA, POLICY = 0.5, "score"
ON = {"capacity_factor": GAMMA, "policy": POLICY}
LIBRARIES = ("torch", "torchtitan", "litgpt", "deepspeed", "torchtune", "megatron-core",
             "ai2-olmo-core", "transformers")  # fmt: skip
OWN_CAPACITY = "own capacity"  # what a correct reason for leaving an own-capacity layer says

# Libraries that install from the registry but whose MoE layer cannot run here, and why
# (checked by :func:`probe_not_runnable`, which re-derives each reason from the installed code).
NOT_RUNNABLE = {
    "torchtune": (
        "torchtune 0.6.1 (its latest release on the registry) has no MoE layer: "
        "torchtune.modules.moe exists only on its main branch, unreleased"
    ),
    "megatron-core": (
        "megatron-core 0.16.1 installs, but its MoE router does not run on a CPU-only torch: "
        "TopKRouter.gating moves a CPU router weight to torch.cuda.current_device() "
        "(megatron/core/transformer/moe/router.py), and router_gating_linear reads "
        "te_general_gemm, a name defined only when transformer_engine (CUDA) imports "
        "(moe_utils.py: NameError without it)"
    ),
    "ai2-olmo-core": (
        "ai2-olmo-core 3.0.0 installs, but both its MoE layers (MoEType.default with a capacity "
        "factor, MoEType.dropless) gather and scatter tokens with Triton kernels "
        "(olmo_core/kernels/moe.py) that have no CPU path: 'RuntimeError: 0 active drivers' "
        "on a machine without a GPU"
    ),
}


class NotInstalled(Exception):
    pass


@dataclasses.dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    # gamma -> (output, pairs dropped): None for layers that must be left as written
    oracle: Callable[[float | None], tuple[torch.Tensor, int]] | None
    own_capacity: bool
    note: str
    library: str


def _seeded(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, HIDDEN, generator=g)


@torch.no_grad()
def _randomize_(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Every parameter random (libraries zero some at init), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.copy_(std * torch.randn(p.shape, generator=g).to(p.dtype))


def _route(P, ids, W, gamma):
    """``capmoe_compile.route`` on a layer's own (P, S, W); a dropped pair keeps its expert id
    with weight 0 (it then contributes nothing where W scales the expert output)."""
    from capmoe_compile import config, route

    k = ids.shape[-1]  # ids [T, k], or [B, L, k] (torchtitan's router)
    T = ids.numel() // k
    ids2, w2 = route(
        P.reshape(T, -1).float(),
        ids.reshape(T, k),
        W.reshape(T, k).float(),
        capacity_factor=gamma,
        policy=POLICY,
        min_tokens=config.min_tokens,
    )
    ids2, w2 = ids2[:, :k], w2[:, :k]
    drop = ids2 >= P.shape[-1]
    ids_new = torch.where(drop, ids.reshape(T, k).long(), ids2.long()).to(ids.dtype)
    w_new = torch.where(drop, torch.zeros_like(w2), w2).to(W.dtype)
    return ids_new.view(ids.shape), w_new.view(W.shape), int(drop.sum())


# ------------------------------------------------------------------------------------------
# torchtitan


def _torchtitan(seed: int, score_func: str, route_norm: bool, bias: bool) -> Case:
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
        raise NotInstalled(f"torchtitan: {e}") from e
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
            score_func=score_func,
            route_norm=route_norm,
        ),
        load_balance_coeff=1e-3 if bias else None,
    )
    model = cfg.build()
    _randomize_(model, seed)
    model.eval()
    if bias:  # the auxiliary-loss-free selection bias, as after training (random, not zero)
        g = torch.Generator().manual_seed(seed + 2)
        model.expert_bias_E.copy_(0.05 * torch.randn(E, generator=g))
    router = model.router
    # torchtitan's router, as released, called with the capacity step after it
    original = type(router).forward

    def oracle(gamma):
        dropped = [0]

        def routed(self, x_BLD, expert_bias_E=None):
            w, ids, scores = original(self, x_BLD, expert_bias_E)
            if gamma is None:
                return w, ids, scores
            # SPEC: P is the score function's output before the selection bias (scores_BLE)
            ids, w, dropped[0] = _route(scores, ids, w, gamma)
            return w, ids, scores

        router.forward = routed.__get__(router)
        try:
            with torch.no_grad():
                return model(x), dropped[0]
        finally:
            del router.forward

    x = _seeded(seed)
    note = f"TokenChoiceTopKRouter ({score_func}, route_norm={route_norm}"
    note += ", expert bias)" if bias else ")"
    note += " + GroupedExperts (torch._grouped_mm) + LocalTokenDispatcher"
    return Case(model, x, oracle, False, note, "torchtitan")


def build_torchtitan_sigmoid_bias(seed: int = 0) -> Case:
    return _torchtitan(seed, "sigmoid", True, True)


def build_torchtitan_softmax(seed: int = 0) -> Case:
    return _torchtitan(seed, "softmax", False, False)


# ------------------------------------------------------------------------------------------
# litgpt


def build_litgpt_llamamoe(seed: int = 0) -> Case:
    try:
        from litgpt.config import Config
        from litgpt.model import LLaMAMoE
    except ImportError as e:
        raise NotInstalled(f"litgpt: {e}") from e
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
    model.eval()
    x = _seeded(seed)

    def oracle(gamma):
        # LLaMAMoE: top-k of the gate's raw logits, softmax over the selected (W); SPEC: P is
        # the softmax of the logits over all experts. Then every kept pair through litgpt's own
        # expert modules, weighted by W, summed per token.
        with torch.no_grad():
            h = x.reshape(-1, HIDDEN)
            logits = model.gate(h)
            top, ids = torch.topk(logits, K)
            W = top.softmax(dim=1, dtype=torch.float).to(h.dtype)
            dropped = 0
            if gamma is not None:
                ids, W, dropped = _route(logits.softmax(-1), ids, W, gamma)
            y = torch.zeros_like(h)
            for e, expert in enumerate(model.experts):
                t, j = torch.where(ids == e)
                if t.numel():
                    y.index_add_(0, t, W[t, j, None] * expert(h[t]))
        return y.view_as(x), dropped

    return Case(model, x, oracle, False, "top-2 of logits, softmax over the selected, "
                "torch.where dispatch over nn.ModuleList of LLaMAMLP", "litgpt")  # fmt: skip


# ------------------------------------------------------------------------------------------
# DeepSpeed


def _deepspeed_ready():
    try:
        import deepspeed
    except ImportError as e:
        raise NotInstalled(f"deepspeed: {e}") from e
    import torch.distributed as dist

    if not dist.is_initialized():  # a gloo group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return deepspeed


class _FirstOutput(nn.Module):
    """DeepSpeed's MoE returns (output, l_aux, exp_counts): the output only."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)[0]


def _deepspeed(seed, k, eval_capacity_factor, min_capacity, drop_tokens) -> Case:
    _deepspeed_ready()
    from deepspeed.moe.layer import MoE as DSMoE

    expert = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
    moe = DSMoE(
        hidden_size=HIDDEN,
        expert=expert,
        num_experts=E,
        ep_size=1,
        k=k,
        capacity_factor=1.0,
        eval_capacity_factor=eval_capacity_factor,
        min_capacity=min_capacity,
        drop_tokens=drop_tokens,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    model = _FirstOutput(moe)
    _randomize_(model, seed)
    model.eval()
    x = _seeded(seed)
    if drop_tokens:
        return Case(model, x, None, True, "", "deepspeed")
    gate = moe.deepspeed_moe.gate
    experts = moe.deepspeed_moe.experts.deepspeed_experts

    def oracle(gamma):
        # drop_tokens=False, top-2: gates = softmax(logits) (fp32), first pick argmax, second
        # argmax with the first masked, both gates renormalised over the pair; capacity = the
        # largest expert count, so nothing is dropped (SPEC: the layer is dropless). P = gates.
        with torch.no_grad():
            h = x.reshape(-1, HIDDEN)
            logits = gate.wg(h.float())
            P = logits.softmax(-1)
            i1 = P.argmax(-1)
            i2 = logits.masked_fill(nn.functional.one_hot(i1, E).bool(), float("-inf")).argmax(-1)
            ids = torch.stack([i1, i2], -1)
            g = P.gather(-1, ids)
            W = g / g.sum(-1, keepdim=True).clamp(min=torch.finfo(g.dtype).eps)
            dropped = 0
            if gamma is not None:
                ids, W, dropped = _route(P, ids, W, gamma)
            y = torch.zeros_like(h)
            for e, ex in enumerate(experts):
                t, j = torch.where(ids == e)
                if t.numel():
                    y.index_add_(0, t, (W[t, j, None] * ex(h[t])).to(h.dtype))
        return y.view_as(x), dropped

    return Case(model, x, oracle, False, "", "deepspeed")


def build_deepspeed_top1_binding(seed: int = 0) -> Case:
    c = _deepspeed(seed, k=1, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True)
    c.note = "top-1, eval_capacity_factor 1.0 (binds: tokens dropped), gloo group of one"
    return c


def build_deepspeed_top2_nonbinding(seed: int = 0) -> Case:
    c = _deepspeed(seed, k=2, eval_capacity_factor=float(E), min_capacity=4, drop_tokens=True)
    c.note = (
        "top-2, eval_capacity_factor E (never binds; a cumsum-position mask), gloo group of one"
    )
    return c


def build_deepspeed_top2_dropless(seed: int = 0) -> Case:
    c = _deepspeed(seed, k=2, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False)
    c.note = "top-2, drop_tokens=False (capacity = the largest expert count: dropless)"
    return c


CASES: dict[str, Callable[[int], Case]] = {
    "torchtitan_sigmoid_bias": build_torchtitan_sigmoid_bias,
    "torchtitan_softmax": build_torchtitan_softmax,
    "litgpt_llamamoe": build_litgpt_llamamoe,
    "deepspeed_top1_binding": build_deepspeed_top1_binding,
    "deepspeed_top2_nonbinding": build_deepspeed_top2_nonbinding,
    "deepspeed_top2_dropless": build_deepspeed_top2_dropless,
}


# ------------------------------------------------------------------------------------------
# libraries that do not run here: the reason, re-derived from the installed code


def probe_not_runnable(lib: str) -> dict[str, Any]:
    """Whether ``lib`` is installed, and evidence for :data:`NOT_RUNNABLE`'s reason from the
    installed package (so the reason is checked against the release, not remembered)."""
    rec: dict[str, Any] = {"library": lib, "reason": NOT_RUNNABLE[lib]}
    try:
        rec["version"] = importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        rec["version"] = None
        rec["verdict"] = "not installed"
        return rec
    if lib == "torchtune":
        rec["evidence"] = {
            "torchtune.modules.moe in the release's RECORD": any(
                "modules/moe/" in str(f) for f in importlib.metadata.files("torchtune") or []
            )
        }
    elif lib == "megatron-core":
        spec = importlib.util.find_spec("megatron.core")
        base = Path(spec.origin).parent / "transformer" / "moe"
        router = (base / "router.py").read_text()
        utils = (base / "moe_utils.py").read_text()
        rec["evidence"] = {
            "router.py moves weights to torch.cuda.current_device()": (
                "torch.cuda.current_device()" in router
            ),
            "moe_utils.py reads te_general_gemm": "te_general_gemm is not None" in utils,
            "transformer_engine importable": importlib.util.find_spec("transformer_engine")
            is not None,
        }
    elif lib == "ai2-olmo-core":
        spec = importlib.util.find_spec("olmo_core")
        kernels = (Path(spec.origin).parent / "kernels" / "moe.py").read_text()
        rec["evidence"] = {"kernels/moe.py uses triton": "import triton" in kernels}
    rec["verdict"] = "does not run on CPU" if lib != "torchtune" else "no MoE in the release"
    return rec


# ------------------------------------------------------------------------------------------
# measuring


def _short(e: BaseException, limit: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _compiled(model, x, backend, options=None):
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            return torch.compile(model, backend=backend, options=options)(x), None
    except Exception as e:  # noqa: BLE001 - recorded
        return None, _short(e)
    finally:
        torch._dynamo.reset()


def run_case(name: str, seed: int = 0, inductor: bool = True) -> dict[str, Any]:
    import capmoe_compile

    rec: dict[str, Any] = {"case": name}
    try:
        case = CASES[name](seed)
    except NotInstalled as e:
        return rec | {"verdict": "not installed", "why": str(e)}
    except Exception as e:  # noqa: BLE001
        return rec | {"verdict": "does not build", "why": _short(e)}
    model, x = case.model, case.x
    rec |= {"library": case.library, "note": case.note, "own_capacity": case.own_capacity}
    with torch.no_grad():
        eager = model(x)
        rec["eager_deterministic"] = bool(torch.equal(eager, model(x)))
    scale = max(1.0, float(eager.abs().max()))
    floor = 1e-5 * scale

    if inductor:
        t0 = time.perf_counter()
        ind, err = _compiled(model, x, "inductor")
        rec["inductor"] = {"error": err, "s": round(time.perf_counter() - t0, 1)}
        if ind is not None:
            rec["inductor"]["diff"] = _diff(ind, eager)
    ind_diff = rec.get("inductor", {}).get("diff")
    bound = max(2 * ind_diff, floor) if ind_diff is not None else floor
    rec["bound"] = bound

    t0 = time.perf_counter()
    off, err = _compiled(model, x, "capmoe")
    rec["off"] = {"error": err, "s": round(time.perf_counter() - t0, 1)}
    if off is not None:
        rec["off"]["diff"] = _diff(off, eager)

    torch._dynamo.reset()
    try:
        rep = capmoe_compile.explain(model)(x)
        rec["explain"] = {
            "matched": [
                {"name": r.name, "router": r.router, "dispatch": r.dispatch, "experts": r.experts}
                for r in rep.layers
            ],
            "left": [{"name": r.name, "reason": r.reason} for r in rep.unmatched],
            "graphs": rep.graphs,
        }
    except Exception as e:  # noqa: BLE001
        rec["explain"] = {"error": _short(e), "matched": [], "left": []}
    torch._dynamo.reset()

    t0 = time.perf_counter()
    on, err = _compiled(model, x, "capmoe", ON)
    rec["on"] = {"error": err, "s": round(time.perf_counter() - t0, 1)}
    if on is not None:
        rec["on"]["vs_eager"] = _diff(on, eager)
        if case.oracle is not None:
            try:
                base, _ = case.oracle(None)
                want, dropped = case.oracle(GAMMA)
                rec["on"] |= {
                    "oracle_off_error": _diff(base, eager),
                    "oracle_dropped": dropped,
                    "oracle_effect": _diff(want, eager),
                    "vs_oracle": _diff(on, want),
                }
            except Exception as e:  # noqa: BLE001
                rec["on"]["oracle_error"] = _short(e)
                rec["on"]["oracle_trace"] = traceback.format_exc()[-1200:]
    rec["verdict"], rec["why"] = verdict(rec, case)
    return rec


def verdict(rec: dict[str, Any], case: Case) -> tuple[str, str]:
    off, on, ex = rec["off"], rec["on"], rec["explain"]
    ind_ok = rec.get("inductor", {}).get("error") is None
    bound = rec["bound"]
    if off["error"]:
        return ("CRASH" if ind_ok else "inductor fails too"), f"capacity off: {off['error']}"
    if off["diff"] > bound:
        return "WRONG", f"capacity off: |compiled - eager| {off['diff']:.3g} > {bound:.3g}"
    if "error" in ex:
        return "CRASH", f"explain: {ex['error']}"
    if on["error"]:
        return "CRASH", f"capacity on: {on['error']}"
    left = "; ".join(f"{r['name']}: {r['reason']}" for r in ex["left"]) or "no router site listed"
    matched = bool(ex["matched"])
    if not matched:
        if on["vs_eager"] > bound:
            return "WRONG", f"left, but capacity on != eager ({on['vs_eager']:.3g}): {left}"
        if case.own_capacity:
            if OWN_CAPACITY in left:
                return "left-correct", left
            return "left-wrong-reason", f"its own capacity is not what the reason says: {left}"
        return "left-gap", left
    if case.own_capacity:
        return "WRONG", "a layer that enforces its own capacity was rewritten"
    if "vs_oracle" not in on:
        return "WRONG", f"matched, no working oracle: {on.get('oracle_error')}"
    if on["oracle_off_error"] > bound:
        return "WRONG", f"the oracle at capacity off is {on['oracle_off_error']:.3g} off eager"
    if not on["oracle_dropped"]:
        return "WRONG", "the oracle dropped nothing: capacity on is not tested"
    if on["vs_oracle"] > max(bound, 2 * on["oracle_off_error"]):
        return "WRONG", f"capacity on != oracle ({on['vs_oracle']:.3g})"
    return "matched", f"capacity on == oracle ({on['oracle_dropped']} pairs dropped)"


# ------------------------------------------------------------------------------------------
# driver


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in rows if r["verdict"] not in ("not installed", "does not build")]
    ok = [r for r in ran if r["verdict"] in ("matched", "left-correct")]
    count = {}
    for r in rows:
        count[r["verdict"]] = count.get(r["verdict"], 0) + 1
    return {
        "cases_run": len(ran),
        "matched_or_correctly_left": f"{len(ok)}/{len(ran)} "
        f"({100 * len(ok) / max(1, len(ran)):.0f}%)",
        "verdicts": count,
        "wrong": sorted(r["case"] for r in rows if r["verdict"] == "WRONG"),
        "crash": sorted(r["case"] for r in rows if r["verdict"] == "CRASH"),
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2g}"


def markdown(payload: dict[str, Any]) -> str:
    meta, rows = payload["meta"], payload["rows"]
    lines = [
        "## Third-party MoE layers",
        "",
        f"Command: `{meta['command']}` in the second environment "
        "(`pip install -r benchmarks/third_party-requirements.txt`); "
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        + ".",
        "",
        f"Config: H={HIDDEN}, F={FFN}, E={E}, T={BATCH * SEQ}, fp32; capacity on = {ON}. "
        "Rule: see `benchmarks/third_party.py`'s docstring.",
        "",
        "Summary: " + json.dumps(payload["summary"]),
        "",
        "| case | what | inductor | capmoe off (bound) | explain | capacity on | verdict | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "off" not in r:
            lines.append(f"| {r['case']} |  |  |  |  |  | {r['verdict']} | {r['why']} |")
            continue
        ex = r["explain"]
        on = r["on"]
        if "vs_oracle" in on and ex.get("matched"):
            on_s = f"vs oracle {_fmt(on['vs_oracle'])} ({on['oracle_dropped']} dropped)"
        elif on.get("error"):
            on_s = "error"
        else:
            on_s = f"vs eager {_fmt(on.get('vs_eager'))}"
            if "oracle_dropped" in on:
                on_s += f" (oracle would drop {on['oracle_dropped']})"
        ind = r.get("inductor", {})
        lines.append(
            f"| {r['case']} | {r['note']} | {_fmt(ind.get('diff')) if not ind.get('error') else 'fails'} "
            f"| {_fmt(r['off'].get('diff'))} ({_fmt(r['bound'])}) "
            f"| {len(ex.get('matched', []))} matched / {len(ex.get('left', []))} left "
            f"| {on_s} | **{r['verdict']}** | {r['why'][:400].replace('|', '/')} |"
        )
    for n in payload["not_runnable"]:
        ev = "; ".join(f"{k}: {v}" for k, v in n.get("evidence", {}).items())
        lines.append(
            f"| {n['library']} {n.get('version') or ''} |  |  |  |  |  | {n['verdict']} "
            f"| {n['reason']} (checked: {ev}) |"
        )
    return "\n".join(lines) + "\n"


def _worker(name: str, inductor: bool) -> None:
    import logging

    torch.set_num_threads(1)
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    try:
        rec = run_case(name, inductor=inductor)
    except Exception as e:  # noqa: BLE001
        rec = {"case": name, "verdict": "CRASH", "why": _short(e)}
    print("\n@@ROW@@" + json.dumps(rec, default=str), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated (default: all)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "coverage_third_party.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, not args.no_inductor)
        return
    from benchmarks.common import machine

    names = args.cases.split(",") if args.cases else list(CASES)
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.third_party", "--worker", name]
        if args.no_inductor:
            cmd.append("--no-inductor")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
            )
            got = [ln for ln in p.stdout.splitlines() if ln.startswith("@@ROW@@")]
            rec = (
                json.loads(got[-1][7:])
                if got
                else {
                    "case": name,
                    "verdict": "CRASH",
                    "why": f"worker died (rc {p.returncode}): {p.stderr[-300:]}",
                }
            )
        except subprocess.TimeoutExpired:
            rec = {"case": name, "verdict": "CRASH", "why": f"timed out after {args.timeout} s"}
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name:<28} {rec['verdict']:<18} {rec['why'][:150]}", flush=True)
        rows.append(rec)
    m = machine()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    payload = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": commit,
            "command": "python -m benchmarks.third_party " + " ".join(argv or sys.argv[1:]),
            "machine": f"{m.get('cpu')} ({m.get('cores')} cores, shared), torch threads 1",
            "versions": versions(),
        },
        "rows": rows,
        "not_runnable": [probe_not_runnable(lib) for lib in NOT_RUNNABLE],
    }
    payload["summary"] = summary(rows)
    out = Path(args.out)
    out.write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(payload))
    print(json.dumps(payload["summary"], indent=1))


if __name__ == "__main__":
    main()
