"""One MoE layer, every way of running it: transformers eager, Inductor, capmoe.

    python -m benchmarks.moe_layer                      # CPU fp32: prefill, decode, fine
    python -m benchmarks.moe_layer --dtypes fp32,bf16   # bf16 too (slow on CPUs without AMX)
    python -m benchmarks.moe_layer --quick              # tiny smoke run (CI)
    python -m benchmarks.moe_layer --shapes qwen3@512,deepseek@2048 --threads 1
    python -m benchmarks.moe_layer --shapes fine,decode --threads 1 --timer thread  # CPU time
    python -m benchmarks.moe_layer --out benchmarks/results/cpu_fp32_<date>.json
    python -m benchmarks.moe_layer --profile            # + torch.profiler of capmoe's prefill
    python -m benchmarks.moe_layer --shapes fine --profile fine

The layer is one MoE block (transformers' ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``
or ``DeepseekV3MoE``) from a 1-layer ``zoo.build(family, ..., skew=1.5)`` model. Its input is the
hidden state the model itself feeds the block (captured with a forward pre-hook on random token
ids), so it carries the shared direction that makes the router skewed the way trained routers
are (``zoo.skew_router_``); the table reports the resulting max/mean expert load before and after
capacity.

Shapes (``--quick`` shrinks them; ``name@T`` runs a shape at another token count):

- ``prefill`` T=2048, H=1024, F=2048, E=8, k=2 (Mixtral-like); ``decode`` T=16 on the same
  layer (16 sequences of one token); ``fine`` T=2048, H=1024, F=512, E=64, k=8;
- ``qwen3`` T=2048, H=1024, F=768, E=128, k=8 (Qwen3-MoE-like);
- ``deepseek`` T=2048, H=1024, F=512, E=256, k=8, one shared expert of F=512 (DeepSeek-V3-like:
  sigmoid scores, group-limited top-k); the shared expert's FLOPs and bytes are in its floor.

Rows, per shape and dtype, measured in one run and interleaved round-robin, median of ``--reps``:

- ``hf_grouped_mm``: the block in eager mode with its default experts implementation;
- ``hf_eager``: the same block with transformers' ``eager`` experts implementation;
- ``inductor``: ``torch.compile(block)`` with the default backend (Inductor);
- ``capmoe_off``: ``torch.compile(block, backend="capmoe")``, capacity off (``gamma=None``);
- ``capmoe_score``: the same compiled block under ``config.patch(capacity_factor=1.0)``;
- ``capmoe_expanded``: compiled with ``capacity_factor=1.0, policy="expanded_drop"``;
- ``capmoe_*@F16``: capmoe on a copy of the layer with the same router and F=16: its time is
  routing + capacity + dispatch + combine (the expert GEMMs are ~free), the overhead part;
  compiled with the same lowering as the full layer (``capmoe::experts_cpu`` on CPU, forced:
  the copy's weights are below ``grouped.CPU_OP_MIN_WEIGHTS``);
- ``gemm_peak`` (a large ``torch.mm``) and ``copy_bw`` (a large copy): the measured peak and
  bandwidth the floors use.

The in-situ breakdown of ``capmoe_off`` and ``capmoe_score`` (:func:`breakdown`): a few more
calls of the timed compiled layer under ``torch.profiler``, split into the route op
(``capmoe::route_layer``: top-k and capacity), dispatch (counts, sort, gathering the kept
rows), the experts (their GEMMs and activations) and combine (weighting and ``index_add_``),
each the ``capmoe::<phase>`` range ``capmoe::experts_cpu`` opens while a profiler records;
what is left is the router GEMM, the graph's own kernels and the call's overhead. Its
``routing + dispatch + combine`` share is measured on the layer as it runs, where the ``@F16``
rows are a model of it that also pays the router GEMM and ``[rows, H] x [H, 32]`` products.

Each row's floor is max(FLOPs / peak, bytes / bandwidth). FLOPs are the FLOPs actually computed:
the router plus 6*H*F per computed (token, expert) pair (T*k pairs without capacity; the kept
pairs, from ``capmoe_compile.record_stats()`` in an untimed call, with it). Bytes are the expert
weights of experts that get at least one pair, the router weight and the input and output
activations. ``%peak`` = FLOPs / (time * peak), ``%bw`` = bytes / (time * bandwidth), ``%floor`` =
floor / time. All compiled rows use ``dynamic=False`` (one static graph per shape, Inductor's
best case).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from typing import Any

import torch

import capmoe_compile
from capmoe_compile.lowering import grouped
from capmoe_compile.testing import zoo

from .common import (
    Floor,
    copy_bw_row,
    fmt_table,
    gemm_peak_row,
    interleaved,
    isa_line,
    json_line,
    loadavg_end,
    machine,
    median,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# layer configs (zoo family, sizes); shapes name a layer and a token count
LAYERS_FULL = {
    "e8": dict(family="mixtral", H=1024, F=2048, E=8, k=2),
    "e64": dict(family="mixtral", H=1024, F=512, E=64, k=8),
    # Qwen3-MoE-like: fine-grained experts, softmax top-k renormalised
    "e128": dict(family="qwen3_moe", H=1024, F=768, E=128, k=8),
    # DeepSeek-V3-like, one layer: sigmoid group-limited routing and a shared expert (F=512)
    "e256": dict(family="deepseek_v3", H=1024, F=512, E=256, k=8, shared_F=512),
}
LAYERS_QUICK = {
    "e8": dict(family="mixtral", H=64, F=128, E=8, k=2),
    "e64": dict(family="mixtral", H=64, F=32, E=64, k=8),
    "e128": dict(family="qwen3_moe", H=64, F=32, E=128, k=8),
    "e256": dict(family="deepseek_v3", H=64, F=32, E=256, k=8, shared_F=32),
}
SHAPES_FULL = {
    "prefill": ("e8", 2048),
    "decode": ("e8", 16),
    "fine": ("e64", 2048),
    "qwen3": ("e128", 2048),
    "deepseek": ("e256", 2048),
}
SHAPES_QUICK = {
    "prefill": ("e8", 128),
    "decode": ("e8", 4),
    "fine": ("e64", 128),
    "qwen3": ("e128", 128),
    "deepseek": ("e256", 128),
}
#: Shapes whose input is decode tokens (T sequences of one token), not one prefill batch.
DECODE_SHAPES = ("decode",)
TINY_F = 16  # the overhead rows' F (a multiple of 16 bytes in fp32 and bf16)

EAGER_ROWS = ("hf_grouped_mm", "hf_eager")
SCORE = {"capacity_factor": 1.0, "policy": "score"}
EXPANDED = {"capacity_factor": 1.0, "policy": "expanded_drop"}


# ---------------------------------------------------------------------------------------------
# building the layer and its input
# ---------------------------------------------------------------------------------------------


def build_layer(cfg: dict, dtype: torch.dtype, skew: float, max_tokens: int, device="cpu"):
    """(block, hidden states [B, S, H] the model feeds it, B*S >= max_tokens)."""
    model = zoo.build(
        cfg.get("family", "mixtral"),
        num_layers=1,
        hidden=cfg["H"],
        ffn=cfg["F"],
        num_experts=cfg["E"],
        top_k=cfg["k"],
        skew=skew,
        dtype=dtype,
    )
    model = _to(model, device)
    block = zoo.moe_layers(model)[0].block
    seq = min(512, max_tokens)  # the zoo models have 512 positions
    batch = -(-max_tokens // seq)
    captured = {}

    def hook(module, args):
        captured["x"] = args[0].detach().clone()

    handle = block.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(zoo.random_input_ids(model, batch=batch, seq=seq, seed=1).to(device))
    finally:
        handle.remove()
    return model, block, captured["x"]


def _to(model, device):
    return model if torch.device(device).type == "cpu" else model.to(device)


def tiny_copy(cfg: dict, block, dtype: torch.dtype, device="cpu"):
    """A layer with ``block``'s router and F=TINY_F experts: same routing, ~free GEMMs."""
    model = zoo.build(
        cfg.get("family", "mixtral"),
        num_layers=1,
        hidden=cfg["H"],
        ffn=TINY_F,
        num_experts=cfg["E"],
        top_k=cfg["k"],
        skew=None,
        dtype=dtype,
    )
    tiny = zoo.moe_layers(model)[0].block
    with torch.no_grad():
        # the router's parameters and buffers (weight; DeepSeek's correction bias)
        tiny.gate.load_state_dict(block.gate.state_dict())
    return _to(model, device), tiny


def eager_copy(block):
    """The block with transformers' ``eager`` experts implementation (its own config copy)."""
    e = copy.deepcopy(block)
    e.experts.config._experts_implementation = "eager"
    return e


def decode_input(x: torch.Tensor, T: int) -> torch.Tensor:
    """T decode tokens: T sequences of one token each."""
    return x.reshape(-1, x.shape[-1])[:T].reshape(T, 1, x.shape[-1]).contiguous()


def prefill_input(x: torch.Tensor, T: int) -> torch.Tensor:
    B, S, H = x.shape
    if T % S == 0:
        return x[: T // S].contiguous()
    return x.reshape(-1, H)[:T].reshape(1, T, H).contiguous()


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _same_lowering(row: str):
    """The overhead rows (``@F16``) must run the lowering the full layer runs: their weights are
    below ``grouped.CPU_OP_MIN_WEIGHTS``, so the CPU op is forced while they compile (the
    choice is made when AOTAutograd traces the graph, on the first call)."""
    if "@F" not in row:
        yield
        return
    saved = grouped.CPU_OP_MIN_WEIGHTS
    grouped.CPU_OP_MIN_WEIGHTS = 0
    try:
        yield
    finally:
        grouped.CPU_OP_MIN_WEIGHTS = saved


def _patched(fn, opts):
    def run(x):
        with capmoe_compile.config.patch(**opts):
            return fn(x)

    run.compiled = fn  # the compiled module, for explain (_explain_text)
    return run


def make_rows(block, tiny, overhead: bool, frozen: bool = False) -> dict[str, Any]:
    """name -> callable(x) for every row of one layer. Compiled rows are not compiled yet.
    ``frozen``: the capmoe rows run with ``capmoe_compile.freeze_experts`` (packed expert
    weights), and ``capmoe_off_unfrozen`` (a copy of the layer, not frozen) is the same
    compiled layer without them, interleaved with the rest."""
    rows: dict[str, Any] = {
        "hf_grouped_mm": block,
        "hf_eager": eager_copy(block),
        "inductor": torch.compile(block, dynamic=False),
    }
    cap = torch.compile(block, backend="capmoe", dynamic=False)
    rows["capmoe_off"] = cap
    rows["capmoe_score"] = _patched(cap, SCORE)
    rows["capmoe_expanded"] = torch.compile(
        block, backend="capmoe", dynamic=False, options=EXPANDED
    )
    if overhead:
        cap_t = torch.compile(tiny, backend="capmoe", dynamic=False)
        rows[f"capmoe_off@F{TINY_F}"] = cap_t
        rows[f"capmoe_score@F{TINY_F}"] = _patched(cap_t, SCORE)
    if frozen:
        rows["capmoe_off_unfrozen"] = torch.compile(
            copy.deepcopy(block), backend="capmoe", dynamic=False
        )
        capmoe_compile.freeze_experts(block)
        capmoe_compile.freeze_experts(tiny)
    return rows


def loads_of(fn, x, opts: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loads before, loads after capacity) of one untimed call of a capmoe row."""
    with capmoe_compile.config.patch(**(opts or {})), capmoe_compile.record_stats() as st:
        fn(x)
    if len(st.layers) != 1:
        raise RuntimeError(
            f"expected one MoE layer call in the stats, got {len(st.layers)}; "
            f"capmoe.explain of the layer:\n{_explain_text(fn, x, opts)}"
        )
    return st.layers[0].loads_before, st.layers[0].loads_after


def _explain_text(fn, x, opts: dict | None) -> str:
    """What ``capmoe_compile.explain`` says of the compiled row ``fn`` (why a layer was left
    as written, or which graph it ran in): the diagnosis that goes with a row that recorded
    no MoE layer call (issue 26: a bf16 layer that recorded none on an AMX machine)."""
    target = getattr(fn, "compiled", fn)
    try:
        with capmoe_compile.config.patch(**(opts or {})):
            return str(capmoe_compile.explain(target)(x))
    except Exception as e:  # the diagnosis must not hide the error it explains
        return f"(explain failed: {type(e).__name__}: {e})"


def _imb(loads: torch.Tensor) -> float:
    loads = loads.float()
    return float(loads.max() / loads.mean()) if loads.sum() > 0 else 1.0


def floor_of(cfg, F, T, loads, dtype, peak, bw) -> Floor:
    """FLOPs and bytes actually needed for one call that computes ``loads`` pairs per expert."""
    H, E = cfg["H"], cfg["E"]
    es = torch.tensor([], dtype=dtype).element_size()
    pairs = int(loads.sum())
    active = int((loads > 0).sum())
    # a shared expert (DeepSeek-like layer) runs on every token; its F shrinks with the
    # overhead rows' copy like the routed experts' does
    Fs = cfg.get("shared_F", 0) and (F if F == TINY_F else cfg["shared_F"])
    flops = 2.0 * T * H * E + 6.0 * H * F * pairs + 6.0 * H * Fs * T
    nbytes = es * (H * E + 3.0 * H * F * active + 3.0 * H * Fs + 2.0 * T * H)
    return Floor(flops, nbytes, peak, bw, {"pairs": pairs, "active_experts": active})


# ---------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------


def run_shape(
    name, cfg, T, dtype, rows, x, reps, gemm_n, copy_bytes, compile_s, clock=time.perf_counter
) -> dict:
    """Measure every row on ``x`` interleaved with the peak and bandwidth rows."""
    dev = x.device
    k = cfg["k"]
    rows = dict(rows)
    with torch.no_grad():
        # first calls: compile (static shape) and check against transformers' own output
        for r, fn in rows.items():
            t0 = time.perf_counter()
            with _same_lowering(r):
                fn(x)
            if r not in EAGER_ROWS:
                compile_s.setdefault(name, {})[r] = time.perf_counter() - t0
        ref = rows["hf_grouped_mm"](x).float()
        err = {
            r: float((rows[r](x).float() - ref).abs().max())
            for r in ("hf_eager", "inductor", "capmoe_off", "capmoe_off_unfrozen")
            if r in rows
        }
        tiny_name = f"capmoe_off@F{TINY_F}"
        loads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        loads["capmoe_off"] = loads_of(rows["capmoe_off"], x, None)
        loads["capmoe_score"] = loads_of(rows["capmoe_off"], x, SCORE)
        loads["capmoe_expanded"] = loads_of(rows["capmoe_expanded"], x, None)
        if tiny_name in rows:
            try:
                loads[tiny_name] = loads_of(rows[tiny_name], x, None)
                loads[f"capmoe_score@F{TINY_F}"] = loads_of(rows[tiny_name], x, SCORE)
            except RuntimeError as e:
                # the F=16 copy was left as written (e.g. bf16: its expert form could not be
                # verified at that size): no overhead rows for this shape
                print(f"\n(no F={TINY_F} overhead rows for {name}: {e})")
                rows = {r: fn for r, fn in rows.items() if "@F" not in r}
        before = loads["capmoe_off"][0]
        for r in EAGER_ROWS + ("inductor", "capmoe_off_unfrozen"):
            loads[r] = (before, before)

        peak_fn, peak_flops = gemm_peak_row(gemm_n, dtype, dev)
        bw_fn, bw_bytes = copy_bw_row(copy_bytes, dev)
        timed = {r: (lambda fn=fn: fn(x)) for r, fn in rows.items()}
        timed["gemm_peak"] = peak_fn
        timed["copy_bw"] = bw_fn
        times = interleaved(timed, reps=reps, warmup=1, device=dev, clock=clock)

    peak = peak_flops / median(times["gemm_peak"])
    bw = bw_bytes / median(times["copy_bw"])
    split = {}
    if dev.type == "cpu":  # the phases are ranges of capmoe::experts_cpu, the CPU lowering
        split = {r: breakdown(rows[r], x, clock=clock) for r in ("capmoe_off", "capmoe_score")}
    out_rows = {}
    for r in rows:
        lb, la = loads[r]
        F = TINY_F if "@F" in r else cfg["F"]
        fl = floor_of(cfg, F, T, la, dtype, peak, bw)
        t = median(times[r])
        out_rows[r] = {
            "ms": 1e3 * t,
            "ms_min": 1e3 * min(times[r]),
            "ms_max": 1e3 * max(times[r]),
            "samples_ms": [1e3 * s for s in times[r]],
            "gflop": fl.flops / 1e9,
            "mbytes": fl.bytes / 1e6,
            "flops_floor_ms": 1e3 * fl.flops_s,
            "bytes_floor_ms": 1e3 * fl.bytes_s,
            "floor_ms": 1e3 * fl.floor_s,
            "frac_peak": fl.flops_s / t,
            "frac_bw": fl.bytes_s / t,
            "frac_floor": fl.floor_s / t,
            "pairs": fl.extra["pairs"],
            "active_experts": fl.extra["active_experts"],
            "imbalance_before": _imb(lb),
            "imbalance_after": _imb(la),
            "max_load_after": int(la.max()),
            "max_abs_err_vs_hf": err.get(r),
            "breakdown_ms": split.get(r),
        }
    for r in out_rows:
        out_rows[r]["speedup_vs_hf_grouped_mm"] = (
            out_rows["hf_grouped_mm"]["ms"] / out_rows[r]["ms"]
        )
    return paired(
        {
            "shape": name,
            "dtype": str(dtype).removeprefix("torch."),
            "T": T,
            **cfg,
            "capacity": int(capmoe_compile.capacity(T, cfg["E"], k, 1.0)),
            "loads_before": before.tolist(),
            "loads_after_score": loads["capmoe_score"][1].tolist(),
            "loads_after_expanded": loads["capmoe_expanded"][1].tolist(),
            "imbalance_before": _imb(before),
            "peak_gflops": peak / 1e9,
            "bandwidth_gbs": bw / 1e9,
            "gemm_peak_ms": 1e3 * median(times["gemm_peak"]),
            "copy_bw_ms": 1e3 * median(times["copy_bw"]),
            "gemm_peak_samples_ms": [1e3 * t for t in times["gemm_peak"]],
            "copy_bw_samples_ms": [1e3 * t for t in times["copy_bw"]],
            "peak_gflops_best": peak_flops / min(times["gemm_peak"]) / 1e9,
            "bandwidth_gbs_best": bw_bytes / min(times["copy_bw"]) / 1e9,
            "gemm_n": gemm_n,
            "copy_mbytes": bw_bytes / 1e6,
            "reps": reps,
            "rows": out_rows,
        }
    )


def paired(res: dict) -> dict:
    """``res`` (one shape's result) with each row's ``%peak``, ``%bw`` and ``%floor`` also
    computed per interleaved round, then their median (``frac_*_paired``): round ``i``'s
    sample of the row against round ``i``'s ``gemm_peak`` and ``copy_bw`` samples. On a
    machine whose speed drifts during the run (this shared VM's peak row read 61-80 GFLOP/s
    within one run), the median peak and a row's median time can come from different
    conditions: one run put every fast row at 100-103% of the median peak. Recomputable from
    a recorded JSON (``--bars-of``)."""
    tp, tb = res["gemm_peak_samples_ms"], res["copy_bw_samples_ms"]
    for r in res["rows"].values():
        by_round = list(zip(tp, tb, r["samples_ms"], strict=True))
        f_peak = [r["flops_floor_ms"] * a / res["gemm_peak_ms"] / t for a, _, t in by_round]
        f_bw = [r["bytes_floor_ms"] * b / res["copy_bw_ms"] / t for _, b, t in by_round]
        r["frac_peak_paired"] = median(f_peak)
        r["frac_bw_paired"] = median(f_bw)
        r["frac_floor_paired"] = median([max(a, b) for a, b in zip(f_peak, f_bw, strict=True)])
    return res


#: ``capmoe::<phase>`` ranges of the in-situ breakdown (the route op is a custom op: profiled
#: by name; the others are ranges ``capmoe::experts_cpu`` opens while a profiler records).
PHASES = {
    "route": ("capmoe::route_layer", "capmoe::route"),
    "dispatch": ("capmoe::dispatch",),
    "experts": ("capmoe::experts",),
    "combine": ("capmoe::combine",),
}


def breakdown(fn, x, n: int = 3, clock=time.perf_counter) -> dict | None:
    """Where one call of the compiled layer ``fn`` spends its time, in ms per call: ``n`` calls
    under ``torch.profiler`` (CPU), each :data:`PHASES` range's total, ``other`` the rest of
    the calls' ``clock`` time, and ``overhead_share`` = (route + dispatch + combine) / total.
    ``None`` where no ``capmoe::experts`` range ran (the layer was not lowered to
    ``capmoe::experts_cpu``)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(x)
        for _ in range(2):  # the profiler's own first-use costs (measured: ~2 ms more "other")
            with profile(activities=[ProfilerActivity.CPU]):
                fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = clock()
            for _ in range(n):
                fn(x)
            total = (clock() - t0) / n
    ev = {e.key: e for e in prof.key_averages()}
    if "capmoe::experts" not in ev:
        return None
    ms = {
        phase: sum(ev[k].cpu_time_total for k in keys if k in ev) / 1e3 / n
        for phase, keys in PHASES.items()
    }
    total_ms = 1e3 * total
    ms["other"] = max(0.0, total_ms - sum(ms.values()))
    ms["total"] = total_ms
    ms["overhead_share"] = (ms["route"] + ms["dispatch"] + ms["combine"]) / total_ms
    return ms


def print_shape(res: dict) -> None:
    c = res
    print(
        f"\n== {c['shape']} {c['dtype']}: T={c['T']} H={c['H']} F={c['F']} E={c['E']} k={c['k']}"
        f"  C(gamma=1)={c['capacity']}  max/mean load {c['imbalance_before']:.2f}"
        f"  loads {c['loads_before']}"
    )
    print(
        f"   measured: GEMM peak {c['peak_gflops']:.1f} GFLOP/s (mm {c['gemm_n']}^3,"
        f" {c['gemm_peak_ms']:.1f} ms; best {c['peak_gflops_best']:.1f}), bandwidth"
        f" {c['bandwidth_gbs']:.1f} GB/s (copy {c['copy_mbytes']:.0f} MB, {c['copy_bw_ms']:.1f} ms;"
        f" best {c['bandwidth_gbs_best']:.1f}); median of {c['reps']}; floors use the medians;"
        " /round: the median over rounds of each round's %floor (that round's peak and copy)"
    )
    headers = [
        "row",
        "ms",
        "min",
        "max",
        "vs hf",
        "pairs",
        "max/mean",
        "GFLOP",
        "%peak",
        "MB",
        "%bw",
        "floor ms",
        "%floor",
        "/round",
        "err",
    ]
    rows = []
    for name, r in c["rows"].items():
        rows.append(
            [
                name,
                r["ms"],
                r["ms_min"],
                r["ms_max"],
                f"{r['speedup_vs_hf_grouped_mm']:.2f}x",
                r["pairs"],
                r["imbalance_after"],
                r["gflop"],
                f"{100 * r['frac_peak']:.0f}%",
                r["mbytes"],
                f"{100 * r['frac_bw']:.0f}%",
                r["floor_ms"],
                f"{100 * r['frac_floor']:.0f}%",
                f"{100 * r['frac_floor_paired']:.0f}%",
                None if r["max_abs_err_vs_hf"] is None else f"{r['max_abs_err_vs_hf']:.1e}",
            ]
        )
    print(fmt_table(headers, rows))
    split_rows = [
        [
            name,
            *(r["breakdown_ms"][k] for k in (*PHASES, "other", "total")),
            f"{100 * r['breakdown_ms']['overhead_share']:.1f}%",
        ]
        for name, r in c["rows"].items()
        if r.get("breakdown_ms")
    ]
    if split_rows:
        print(
            "   in-situ breakdown, ms per call under torch.profiler (route + dispatch + combine share):"
        )
        print(fmt_table(["row", *PHASES, "other", "total", "share"], split_rows))


# ---------------------------------------------------------------------------------------------
# the issue's bars
# ---------------------------------------------------------------------------------------------


def _paired_speedup(R: dict, others, row: str) -> float:
    """Median over interleaved rounds of (fastest of ``others`` in that round) / ``row``."""
    samples = zip(*(R[o]["samples_ms"] for o in others), strict=True)
    return median([min(o) / t for o, t in zip(samples, R[row]["samples_ms"], strict=True)])


#: shape -> (label, row, per-round figure, at least) of the issue's fraction bars: % of the
#: ``mm`` peak or of the row's floor, on the FLOPs computed (kept pairs for ``capmoe_score``)
FRACTION_BARS = {
    "prefill": (
        ("capmoe off %peak", "capmoe_off", "frac_peak_paired", 0.92),
        ("capmoe score %peak (kept FLOPs)", "capmoe_score", "frac_peak_paired", 0.88),
    ),
    "fine": (
        ("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.85),
        ("capmoe score %floor", "capmoe_score", "frac_floor_paired", 0.80),
    ),
    "qwen3": (
        ("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.80),
        ("capmoe score %floor", "capmoe_score", "frac_floor_paired", 0.75),
    ),
}


#: Issue 26's fraction bars, per ISA column (added to issue 16's for fp32 on AVX-512; for
#: bf16 they replace them): (label, row, per-round figure, at least). bf16 has one column in
#: the issue, "AMX bf16" (% of the bf16 ``mm`` peak measured in the same run); a bf16 run on a
#: CPU without AMX (AVX-512 bf16 only) is read against it too, its label says which CPU.
ISSUE26_BARS = {
    "AVX-512 fp32": {
        "prefill": (
            ("capmoe off %peak", "capmoe_off", "frac_peak_paired", 0.90),
            ("capmoe score %peak (kept FLOPs)", "capmoe_score", "frac_peak_paired", 0.85),
        ),
        "fine": (("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.85),),
        "qwen3": (("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.80),),
    },
    "bf16": {
        "prefill": (
            ("capmoe off %bf16 peak", "capmoe_off", "frac_peak_paired", 0.70),
            ("capmoe score %bf16 peak (kept FLOPs)", "capmoe_score", "frac_peak_paired", 0.65),
        ),
        "fine": (("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.65),),
        "qwen3": (("capmoe off %floor", "capmoe_off", "frac_floor_paired", 0.60),),
    },
}


def issue26_column(dtype: str, isa: dict | None) -> str | None:
    """Issue 26's column for a result of ``dtype`` ("float32", "bfloat16") measured on ``isa``
    (``common.isa()``; ``None``: unknown, fp32 gets no column)."""
    if dtype == "bfloat16":
        return "bf16"
    if dtype == "float32" and isa and isa.get("cpu_capability") == "AVX512":
        return "AVX-512 fp32"
    return None


def bars(results: list[dict], isa: dict | None = None) -> list[dict]:
    """The performance targets of issues 16 and 26, evaluated on this run's numbers.

    fp32: issue 16's bars (:data:`FRACTION_BARS`), and on an AVX-512 CPU (``isa``, from
    ``common.isa()``) issue 26's AVX-512 column as well; bf16: issue 26's bf16 bars
    (:data:`ISSUE26_BARS`; on a CPU without AMX the label says so) instead of issue 16's fp32
    ones. The speed-up and decode bars are the same in both issues.

    ``%peak`` bars compare with the measured ``mm`` peak, ``%floor`` bars with the row's floor
    (``floor_of``: computed FLOPs at the peak, or weight and activation bytes at the measured
    bandwidth, whichever is larger), both on the FLOPs actually computed (kept pairs for
    ``capmoe_score``). Every figure is paired per interleaved round (the round's peak, copy
    and other rows' samples against the round's sample of the row), then the median over
    rounds: on a machine whose speed drifts, a median peak and a median row time can come from
    different conditions (a run recorded capmoe at 103% of the median peak)."""
    out = []

    def add(name, value, target, ok, note=""):
        out.append({"bar": name, "value": value, "target": target, "ok": bool(ok), "note": note})

    amx = bool(isa and isa.get("amx"))
    for res in results:
        R, tag = res["rows"], f"{res['shape']} {res['dtype']} T={res['T']}"
        base = res["shape"].partition("@")[0]
        col = issue26_column(res["dtype"], isa)
        fraction = [(label, *rest) for label, *rest in FRACTION_BARS.get(base, ())]
        if col == "bf16":
            where = "AMX" if amx else "AVX-512 bf16, no AMX" if isa else "ISA not recorded"
            fraction = []
        if col is not None:
            suffix = f" (issue 26 {col}" + (f"; this CPU: {where})" if col == "bf16" else ")")
            fraction += [
                (label + suffix, *rest) for label, *rest in ISSUE26_BARS[col].get(base, ())
            ]
        for label, row, key, least in fraction:
            v = R[row][key]
            add(f"{tag}: {label}", v, f">= {least:.2f}", v >= least)
        if base == "qwen3":
            sp = _paired_speedup(R, EAGER_ROWS, "capmoe_off")
            add(f"{tag}: capmoe off vs fastest HF path", sp, ">= 1.2x", sp >= 1.2)
        if base == "decode":
            for r in ("capmoe_off", "capmoe_score"):
                sp = _paired_speedup(R, (*EAGER_ROWS, "inductor"), r)
                add(f"{tag}: {r} vs fastest other path (HF, Inductor)", sp, ">= 1.0x", sp >= 1.0)
            ratio = 1.0 / R["capmoe_off"]["frac_bw_paired"]
            add(f"{tag}: capmoe_off time / weight-bytes floor", ratio, "<= 1.3", ratio <= 1.3)
        tiny = R.get(f"capmoe_score@F{TINY_F}")
        if tiny is not None and base != "decode":
            frac = _paired_speedup(R, (f"capmoe_score@F{TINY_F}",), "capmoe_score")
            add(
                f"{tag}: routing+capacity+dispatch+combine / layer (score)",
                frac,
                "<= 0.05",
                frac <= 0.05,
                f"capmoe_score@F{TINY_F} time over capmoe_score time (a model: it also pays"
                " the router GEMM and the F=16 experts' GEMMs)",
            )
        for r in ("capmoe_off", "capmoe_score"):
            split = R[r].get("breakdown_ms")
            if split is not None and base != "decode":
                add(
                    f"{tag}: routing+capacity+dispatch+combine / layer ({r}, in-situ profile)",
                    split["overhead_share"],
                    "<= 0.05",
                    split["overhead_share"] <= 0.05,
                    "route op + dispatch + combine ranges over the profiled call (breakdown)",
                )
    return out


def print_bars(bs: list[dict], quick: bool = False) -> None:
    if not bs:
        return
    note = " -- --quick: tiny shapes, the bars are not meaningful" if quick else ""
    print(f"\n== issue bars (this run){note}")
    rows = [[b["bar"], b["value"], b["target"], "PASS" if b["ok"] else "FAIL"] for b in bs]
    print(fmt_table(["bar", "value", "target", ""], rows))


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------


def profile_rows(block, x, n: int = 3, top: int = 20, tiny: bool = False) -> dict[str, list[dict]]:
    """torch.profiler of capmoe off and score on ``x``: the top ops by self CPU time.

    A separate compile with Inductor's C++ kernel profiling on, so its fused kernels show up by
    name (the timed rows are compiled without it). ``torch._dynamo.reset()`` first: an equal
    ``torch.compile`` wrapper would otherwise reuse the timed rows' graph."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    with (
        torch._inductor.config.patch({"cpp.enable_kernel_profile": True}),
        _same_lowering("@F" if tiny else ""),
    ):
        fn = torch.compile(block, backend="capmoe", dynamic=False)
        with torch.no_grad():
            fn(x)
            with capmoe_compile.config.patch(**SCORE):
                fn(x)
    out = {}
    for label, opts in (("capmoe_off", {}), ("capmoe_score", SCORE)):
        with torch.no_grad(), capmoe_compile.config.patch(**opts):
            fn(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    fn(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        table = [
            {
                "op": e.key,
                "self_ms_per_call": e.self_cpu_time_total / 1e3 / n,
                "share": e.self_cpu_time_total / total if total else 0.0,
                "calls_per_layer_call": e.count / n,
            }
            for e in ranked
        ]
        out[label] = table
        print(f"\n== profile: {label} (self CPU time, per layer call, {n} calls)")
        print(
            fmt_table(
                ["op", "self ms", "share", "calls"],
                [
                    [
                        t["op"][:70],
                        t["self_ms_per_call"],
                        f"{100 * t['share']:.1f}%",
                        t["calls_per_layer_call"],
                    ]
                    for t in table
                ],
            )
        )
    return out


# ---------------------------------------------------------------------------------------------


def bars_of(path: str, out: str | None = None) -> dict:
    """The issue bars of the run recorded in ``path`` (:func:`paired` figures recomputed from
    its samples), printed; written back with them to ``out`` if given."""
    import json

    with open(path) as f:
        payload = json.load(f)
    payload["results"] = [paired(res) for res in payload["results"]]
    payload["bars"] = bars(payload["results"], payload.get("machine", {}).get("isa"))
    for res in payload["results"]:
        print_shape(res)
    print_bars(payload["bars"])
    if out:
        write_json(out, payload)
        print(f"\n# wrote {out}")
    return payload


def parser() -> argparse.ArgumentParser:
    """The command line (also read by ``tests/test_moe_layer_figures.py`` to check the commands
    ``benchmarks/gpu_check.sh`` runs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (smoke run)")
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16 (default fp32)")
    p.add_argument(
        "--shapes",
        default="prefill,decode,fine",
        help="comma list of shapes, each optionally with @T tokens (e.g. qwen3@512,deepseek@8192);"
        " known: prefill, decode, fine, qwen3, deepseek",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    p.add_argument(
        "--reps", type=int, default=None, help="repetitions (median; default 7, quick 5)"
    )
    p.add_argument(
        "--skew", type=float, default=1.5, help="router skew strength (zoo.skew_router_)"
    )
    p.add_argument("--no-overhead", action="store_true", help="skip the F=16 overhead rows")
    p.add_argument(
        "--frozen",
        action="store_true",
        help="capmoe rows with capmoe_compile.freeze_experts (packed expert weights), plus"
        " capmoe_off_unfrozen: the same layer without, interleaved",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="prefill",
        default="",
        help="profile capmoe (off, score; and the F=16 copy) on these shapes (default: prefill)",
    )
    p.add_argument(
        "--timer",
        choices=["wall", "thread"],
        default="wall",
        help="wall clock, or the calling thread's CPU time (with --threads 1 on a shared CPU:"
        " descheduled time not counted; the peak and bandwidth rows are timed the same way)",
    )
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument(
        "--bars-of",
        default=None,
        metavar="JSON",
        help="measure nothing: the issue bars of a recorded run (per-round figures recomputed"
        " from its samples; with --out, the run with them added is written there)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.bars_of:
        return bars_of(args.bars_of, args.out)
    if args.timer == "thread" and (args.threads != 1 or args.device != "cpu"):
        p.error("--timer thread needs --threads 1 on the CPU (other threads' work is not counted)")
    clock = time.thread_time if args.timer == "thread" else time.perf_counter

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    layers = LAYERS_QUICK if args.quick else LAYERS_FULL
    shape_defs = SHAPES_QUICK if args.quick else SHAPES_FULL
    shape_defs = dict(shape_defs)
    shapes = []
    for spec in (s.strip() for s in args.shapes.split(",") if s.strip()):
        base, _, t = spec.partition("@")
        if base not in shape_defs:
            p.error(f"unknown shape {base!r}; known: {', '.join(shape_defs)}")
        if t:
            shape_defs[spec] = (shape_defs[base][0], int(t))
        shapes.append(spec)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    reps = args.reps or (5 if args.quick else 7)
    cuda = torch.device(args.device).type == "cuda"
    gemm_n = 256 if args.quick else (8192 if cuda else 2048)
    copy_bytes = (16 if args.quick else (1024 if cuda else 256)) << 20

    info = machine()
    print(f"# moe_layer benchmark  {info['date']}  {info['cpu']}  torch {info['torch']}")
    print(
        f"# threads {info['torch_threads']}/{info['cores']} cores, load avg {info.get('loadavg_start')}"
    )
    print(isa_line(info["isa"]))
    t_start = time.perf_counter()
    results, compile_s, profiles = [], {}, {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        for lname, cfg in layers.items():
            mine = [s for s in shapes if shape_defs[s][0] == lname]
            if not mine:
                continue
            max_T = max(shape_defs[s][1] for s in mine)
            model, block, x_all = build_layer(cfg, dtype, args.skew, max_T, args.device)
            tiny_model, tiny = tiny_copy(cfg, block, dtype, args.device)
            rows = make_rows(block, tiny, not args.no_overhead, args.frozen)
            for s in mine:
                T = shape_defs[s][1]
                is_decode = s.partition("@")[0] in DECODE_SHAPES
                x = decode_input(x_all, T) if is_decode else prefill_input(x_all, T)
                res = run_shape(
                    s,
                    cfg,
                    T,
                    dtype,
                    rows,
                    x,
                    reps * (3 if is_decode else 1),
                    gemm_n,
                    copy_bytes,
                    compile_s.setdefault(dname, {}),
                    clock,
                )
                results.append(res)
                print_shape(res)
                sys.stdout.flush()
                if s in args.profile.split(",") and dname == dtypes[0]:
                    profiles[f"{s} {dname}"] = profile_rows(block, x)
                    if not args.no_overhead:
                        print(f"\n(F={TINY_F} copy: routing + capacity + dispatch + combine)")
                        profiles[f"{s} {dname} @F{TINY_F}"] = profile_rows(tiny, x, tiny=True)
            del model, block, tiny_model, tiny, rows
            torch._dynamo.reset()

    bs = bars(results, info["isa"])
    print_bars(bs, args.quick)
    loadavg_end(info)
    payload = {
        "benchmark": "moe_layer",
        "args": vars(args),
        "machine": info,
        "wall_s": time.perf_counter() - t_start,
        "compile_s": compile_s,
        "results": results,
        "bars": bs,
        "profiles": profiles,
    }
    if args.out:
        write_json(args.out, payload)
        print(f"\n# wrote {args.out}")
    summary = {
        "benchmark": "moe_layer",
        "date": info["date"],
        "quick": args.quick,
        "rows": {
            f"{r['shape']}/{r['dtype']}/{name}": round(v["ms"], 3)
            for r in results
            for name, v in r["rows"].items()
        },
        "peak_gflops": {f"{r['shape']}/{r['dtype']}": round(r["peak_gflops"], 1) for r in results},
        "bandwidth_gbs": {
            f"{r['shape']}/{r['dtype']}": round(r["bandwidth_gbs"], 2) for r in results
        },
        "bars_ok": sum(b["ok"] for b in bs),
        "bars_total": len(bs),
    }
    print(json_line(summary))
    return payload


if __name__ == "__main__":
    main()
