"""End-to-end ``generate`` speed: what a serving user measures, capmoe against the alternatives.

    python -m benchmarks.generate                     # all models, batch sizes 1, 8, 32
    python -m benchmarks.generate --quick             # small prompts, few tokens, 2 reps
    python -m benchmarks.generate --models shipped --batches 8 --out benchmarks/results/x.json
    python -m benchmarks.generate --dtype bf16 --models mixtral_e8 --batches 8   # bf16 weights

Models: the shipped tiny LM (``capmoe_compile.models.tiny_moe``, 4 layers, H=128, E=8, k=2,
trained, skewed routing), and two random-weight zoo Mixtrals with skewed routers (2 layers):
``mixtral_e8`` H=1024, F=2048, E=8, k=2 and ``fine_e64`` H=1024, F=512, E=64, k=8.

``--dtype bf16`` builds every model in bf16 (the shipped model's fp16 weights cast to bf16,
the zoo models built in bf16) and the decode floor counts bf16 weight bytes; agreement is
still against eager in the same dtype.

Rows, each a copy of the same weights: ``eager`` (transformers as is), ``inductor``
(``model.compile(backend="inductor", dynamic=True)``), and one ``model.compile(backend="capmoe",
dynamic=True)`` copy run as ``capmoe_off`` (capacity off), ``score_1.0`` and ``score_1.25``
(``policy="score"``, gamma 1.0 and 1.25; options are read at run time, so the three share one
compile; with ``--frozen``, that copy's expert weights are frozen, ``capmoe_compile.freeze_experts``).
Greedy decoding, ``min_new_tokens`` = ``max_new_tokens`` so every row generates the
same number of tokens. Prompts are left padded, lengths spread over [P/2, P].

Figures, per model, batch size and row (medians of interleaved repetitions, common.interleaved):

- ``ttft_s``: one ``generate(max_new_tokens=1)`` call: the prefill plus the first token;
- ``prefill_tok_s``: the prompts' real (unpadded) tokens / ``ttft_s``;
- ``decode_tok_s``: ``B * (N - 1)`` / (``generate(N)`` - ``generate(1)``): tokens per second of
  the decode steps alone;
- ``agree``: share of the generated tokens equal to eager's at the same position (greedy), the
  cost of capacity beside its speed; for the shipped model also the held-out perplexity
  with ``--ppl`` (8 windows of 256 bytes of the standard library text it was not trained on;
  ``benchmarks/quality.py`` has the full sweep);
- ``kept``: pairs computed / pairs the model selected, in the prefill (``record_stats``);
- ``floor_tok_s`` (per batch size): the decode weight-bytes floor, ``B`` / (bytes of the
  weights one decode step reads / the copy bandwidth measured in the same interleaved loop,
  ``common.copy_bw_row`` of 256 MB, read + write). A decode step reads every weight once
  (every expert's too, whatever the path, at these batch sizes); the input embedding counts
  only where it is also the output projection (a lookup reads ``B`` rows of it). ``x floor``:
  ``floor_tok_s`` / the row's decode tokens/s (1.0: at the floor);
- ``expert_share`` (capmoe rows): the share of one profiled prefill (``generate(1)``) spent
  in the expert ops (``torch.profiler``: CPU time of ``capmoe::experts_cpu``, or of
  ``capmoe::grouped_mm`` where the layer runs the traced path; there the gather, activation
  and combine kernels Inductor fused around them are not counted, so the share is a lower
  bound); ``route_share`` the same for ``capmoe::route_layer``. ``model_ttft_s`` (capacity
  rows): capmoe off's ``ttft_s`` with only its expert part scaled by ``kept``, ``off * (1 -
  share) + off * share * kept``; ``ttft / model`` is the measured time over that (the issue's
  bar: prefill faster in proportion to the pairs kept, within 15%, which can only hold for
  the expert part); ``expert_ratio``: the row's expert time / capmoe off's (against
  ``kept``: whether the expert part itself shrinks in proportion);
- ``compile_s``: cold compile of the row's first ``generate`` call (Dynamo, capmoe's passes,
  Inductor, C++; caches off, ``fresh_cache``), minus the same call's warm time; reported on
  the first batch size only (later batch sizes reuse the graphs, except batch 1, which Dynamo
  specialises and compiles once more). ``graphs``: graphs the capmoe backend compiled over
  the run (``capmoe_compile.backend.compile_count``).

Threads: one (``--threads``) unless told otherwise; the machine's load average is recorded at
the start and the end. ``--clock thread``: the figures are medians of the calling thread's
CPU time (``time.thread_time``) instead of wall time, which on a shared machine also counts
the time the thread waited for a core; both are recorded (``samples_*``, ``thread_samples_*``). The machines these runs were recorded on are shared: see the JSON.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
import time
import warnings
from typing import Any

import torch

from .common import (
    copy_bw_row,
    fmt_table,
    interleaved,
    json_line,
    loadavg_end,
    machine,
    median,
    write_json,
)

MODELS = {
    "shipped": None,
    "mixtral_e8": dict(hidden=1024, ffn=2048, num_experts=8, top_k=2),
    "fine_e64": dict(hidden=1024, ffn=512, num_experts=64, top_k=8),
}
ROWS = ("eager", "inductor", "capmoe_off", "score_1.0", "score_1.25")
CAPMOE_ROWS = {"capmoe_off": None, "score_1.0": 1.0, "score_1.25": 1.25}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, dtype: torch.dtype = torch.float32):
    from capmoe_compile.testing import zoo

    if name == "shipped":
        from capmoe_compile.models import load_tiny_moe

        return load_tiny_moe(dtype=dtype)[0]
    return zoo.build(
        "mixtral", num_layers=2, vocab=256, seed=0, skew=1.5, dtype=dtype, **MODELS[name]
    )


def prompts(vocab: int, batch: int, longest: int, seed: int = 0):
    """Left-padded random prompts: lengths evenly spread over [longest/2, longest]."""
    from capmoe_compile.testing import serving

    lo = max(1, longest // 2)
    lengths = [lo + (longest - lo) * i // max(1, batch - 1) for i in range(batch)][::-1]
    return serving.left_padded(lengths, seed=seed, vocab=vocab, width=longest)


def gen_call(model, ids, mask, new: int):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


def row_fn(models: dict, row: str):
    """``(model, context)`` of a row: the model to call and the capmoe configuration around it."""
    import capmoe_compile as cc

    if row in CAPMOE_ROWS:
        return models["capmoe"], lambda: cc.config.patch(
            capacity_factor=CAPMOE_ROWS[row], policy="score"
        )
    import contextlib

    return models[row], contextlib.nullcontext


def cold_first_call(model, ids, mask, new: int, fresh: bool) -> float:
    """Seconds of the first generate call (compiles), caches off when ``fresh``."""
    import contextlib

    ctx = contextlib.ExitStack()
    if fresh:
        ctx.enter_context(torch._inductor.utils.fresh_cache())
        ctx.enter_context(torch._inductor.config.patch(force_disable_caches=True))
    with ctx:
        t0 = time.perf_counter()
        gen_call(model, ids, mask, new)
        return time.perf_counter() - t0


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            x = windows[i : i + batch]
            logits = model(input_ids=x, use_cache=False).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


#: The ops whose CPU time is the expert part of a capmoe layer (``expert_share``), and its route op.
EXPERT_OPS = ("capmoe::experts_cpu", "capmoe::grouped_mm")
ROUTE_OP = "capmoe::route_layer"


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: every parameter and buffer of floating
    dtype once (shared ones once), except the input embedding, of which a step reads ``B``
    rows, unless it is also the output projection."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.data_ptr() == emb.data_ptr() and not tied:
            continue
        total += t.numel() * t.element_size()
    return total


def op_shares(call, calls: int = 3) -> dict[str, float]:
    """``calls`` profiled ``call()``: the shares of their wall time spent in the expert ops
    and in the route op (the time of the top-level events of those names; sums over the
    calls, so one descheduled call weighs less)."""
    from torch.profiler import ProfilerActivity, profile

    wall = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            wall += time.perf_counter() - t0
    expert = route = 0.0
    for ev in prof.events():
        if ev.cpu_parent is not None and ev.cpu_parent.name in (*EXPERT_OPS, ROUTE_OP):
            continue  # nested in one counted already
        if ev.name in EXPERT_OPS:
            expert += ev.cpu_time_total * 1e-6
        elif ev.name == ROUTE_OP:
            route += ev.cpu_time_total * 1e-6
    return {"expert_share": expert / wall, "route_share": route / wall, "profiled_s": wall}


def timed(fns: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``common.interleaved`` over ``fns``: wall seconds, and the calling thread's CPU seconds
    of the same calls (``time.thread_time``: with one intra-op thread all of a call's work,
    without the time the thread waited for a core on a shared machine)."""
    cpu: dict[str, list[float]] = {n: [] for n in fns}

    def clocked(n, f):
        def run():
            t0 = time.thread_time()
            f()
            cpu[n].append(time.thread_time() - t0)

        return run

    wall = interleaved({n: clocked(n, f) for n, f in fns.items()}, reps=reps, warmup=0)
    return wall, cpu


def run_model(name: str, args, partial=None) -> dict[str, Any]:
    import capmoe_compile as cc
    from capmoe_compile import backend

    torch._dynamo.reset()
    base = build(name, DTYPES[args.dtype])
    vocab = base.get_input_embeddings().weight.shape[0]
    models = {"eager": base}
    if "inductor" in args.rows:
        models["inductor"] = copy.deepcopy(base)
        models["inductor"].compile(backend="inductor", dynamic=True)
    if any(r in CAPMOE_ROWS for r in args.rows):
        models["capmoe"] = copy.deepcopy(base)
        models["capmoe"].compile(backend="capmoe", dynamic=True)
        if args.frozen:
            import capmoe_compile as cc

            cc.freeze_experts(models["capmoe"])
    rows = [r for r in ROWS if r in args.rows]
    out: dict[str, Any] = {"model": name, "batches": {}, "compile": {}}
    out["weight_bytes_per_step"] = weight_bytes_per_step(base)
    copy_fn, copy_bytes = copy_bw_row(256 << 20)
    copy_fn()  # the destination's pages touched once (the first copy also faults them in)
    graphs_before = backend.compile_count()

    for bi, B in enumerate(args.batches):
        ids, mask = prompts(vocab, B, args.prompt, seed=B)
        real = int(mask.sum())
        res: dict[str, dict[str, Any]] = {r: {} for r in rows}
        # first calls: compile (cold on the first batch size), then the warm reference
        for r in rows:
            model, ctx = row_fn(models, r)
            with ctx():
                first = cold_first_call(model, ids, mask, args.new, fresh=bi == 0 and args.cold)
                t0 = time.perf_counter()
                gen_call(model, ids, mask, args.new)
                warm = time.perf_counter() - t0
            if bi == 0 and r in ("inductor", "capmoe_off"):
                out["compile"][r] = {"first_call_s": first, "warm_call_s": warm}
                out["compile"][r]["compile_s"] = max(0.0, first - warm)
        # agreement with eager and the kept share of the prefill
        want = gen_call(base, ids, mask, args.new)[:, ids.shape[1] :]
        for r in rows:
            model, ctx = row_fn(models, r)
            with ctx(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with cc.record_stats() as st:
                    got = gen_call(model, ids, mask, args.new)[:, ids.shape[1] :]
            res[r]["agree"] = float((got == want).float().mean())
            pre = st.prefill
            if pre:
                before = sum(int(s.loads_before.sum()) for s in pre)
                after = sum(int(s.loads_after.sum()) for s in pre)
                res[r]["kept"] = after / before if before else None
            if r in CAPMOE_ROWS:  # where the prefill's time goes (one profiled call)
                with ctx():
                    call = functools.partial(gen_call, model, ids, mask, 1)
                    res[r].update(op_shares(call))
        # timing: interleaved over rows, generate(1) and generate(N)
        fns = {}
        for r in rows:
            model, ctx = row_fn(models, r)

            def one(model=model, ctx=ctx, new=1, ids=ids, mask=mask):
                with ctx():
                    gen_call(model, ids, mask, new)

            fns[f"{r}|1"] = one
            fns[f"{r}|N"] = lambda one=one: one(new=args.new)
        fns["copy_bw"] = copy_fn
        wall, cpu = timed(fns, args.reps)
        times = cpu if args.clock == "thread" else wall
        bw = copy_bytes / median(times["copy_bw"])
        floor_s = out["weight_bytes_per_step"] / bw
        floor = {"bandwidth_gbs": bw / 1e9, "step_floor_s": floor_s, "floor_tok_s": B / floor_s}
        for r in rows:
            t1, tn = median(times[f"{r}|1"]), median(times[f"{r}|N"])
            res[r].update(
                ttft_s=t1,
                prefill_tok_s=real / t1,
                decode_tok_s=B * (args.new - 1) / (tn - t1) if tn > t1 else float("nan"),
                gen_s=tn,
                samples_1=wall[f"{r}|1"],
                samples_N=wall[f"{r}|N"],
                thread_samples_1=cpu[f"{r}|1"],
                thread_samples_N=cpu[f"{r}|N"],
            )
        _model_prefill(res)
        out["batches"][B] = {
            "prompt_tokens": real,
            "padded": B * args.prompt,
            "decode_floor": floor,
            "rows": res,
        }
        out["graphs"] = backend.compile_count() - graphs_before
        if partial is not None:
            partial(out)  # a long run keeps what it measured so far
        print(
            f"  {name} B={B}: "
            + ", ".join(f"{r} {res[r]['decode_tok_s']:.0f} dec tok/s" for r in rows),
            file=sys.stderr,
            flush=True,
        )
    out["graphs"] = backend.compile_count() - graphs_before
    if name == "shipped" and args.ppl:
        from capmoe_compile.models import stdlib_corpus, validation_windows

        windows = validation_windows(stdlib_corpus(), 256, 8)
        ppl = {"eager": perplexity(base, windows)}
        for r in rows:
            if r in CAPMOE_ROWS:
                with row_fn(models, r)[1]():
                    ppl[r] = perplexity(models["capmoe"], windows)
        out["perplexity"] = ppl
    return out


def _model_prefill(res: dict[str, dict[str, Any]]) -> None:
    """``model_ttft_s`` and ``expert_ratio`` of the capacity rows (see the module docstring)."""
    off = res.get("capmoe_off")
    if not off or "expert_share" not in off:
        return
    for r, v in res.items():
        if r == "capmoe_off" or not v.get("kept") or "expert_share" not in v:
            continue
        share = off["expert_share"]
        v["model_ttft_s"] = off["ttft_s"] * (1 - share + share * v["kept"])
        # expert seconds of the profiled calls, each scaled to its row's median ttft
        mine = v["expert_share"] * v["ttft_s"]
        v["expert_ratio"] = mine / (share * off["ttft_s"]) if share else None


def _proportion(v: dict, off: dict | None) -> float | None:
    """(prefill time / capmoe off's prefill time) / kept share: 1.0 when the prefill's cost
    falls exactly in proportion to the pairs kept; the issue's bar is within 15%."""
    if off is None or not v.get("kept") or v is off:
        return None
    return v["ttft_s"] / off["ttft_s"] / v["kept"]


def table(result: dict) -> str:
    lines = []
    for m in result["models"]:
        lines.append(f"\n== {m['model']} (capmoe graphs compiled over the run: {m['graphs']})")
        head = ["B", "row", "ttft ms", "prefill tok/s", "decode tok/s", "vs eager", "vs ind"]
        head += ["x floor", "agree", "kept", "ttft/off / kept", "exp share", "route share"]
        head += ["exp/off", "model ms", "ttft/model"]
        body = []
        for B, b in m["batches"].items():
            rows = b["rows"]
            fl = b.get("decode_floor", {})
            for r, v in rows.items():
                dec = v["decode_tok_s"]
                model_s = v.get("model_ttft_s")
                body.append(
                    [
                        B,
                        r,
                        1e3 * v["ttft_s"],
                        v["prefill_tok_s"],
                        dec,
                        dec / rows["eager"]["decode_tok_s"] if "eager" in rows else None,
                        dec / rows["inductor"]["decode_tok_s"] if "inductor" in rows else None,
                        fl["floor_tok_s"] / dec if fl and dec == dec and dec else None,
                        v.get("agree"),
                        v.get("kept"),
                        _proportion(v, rows.get("capmoe_off")),
                        v.get("expert_share"),
                        v.get("route_share"),
                        v.get("expert_ratio"),
                        1e3 * model_s if model_s else None,
                        v["ttft_s"] / model_s if model_s else None,
                    ]
                )
        lines.append(fmt_table(head, body))
        for B, b in m["batches"].items():
            if "decode_floor" in b:
                f = b["decode_floor"]
                lines.append(
                    f"B={B} decode floor: {m['weight_bytes_per_step'] / 1e6:.1f} MB of weights "
                    f"per step at {f['bandwidth_gbs']:.1f} GB/s copy bandwidth = "
                    f"{1e3 * f['step_floor_s']:.1f} ms/step, {f['floor_tok_s']:.0f} tok/s"
                )
        if m["compile"]:
            c = m["compile"]
            lines.append(
                "cold compile of the first generate call (s): "
                + ", ".join(f"{r} {v['compile_s']:.1f}" for r, v in c.items())
            )
        if "perplexity" in m:
            lines.append(
                "held-out perplexity: "
                + ", ".join(f"{r} {v:.3f}" for r, v in m["perplexity"].items())
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument(
        "--batches",
        default="8,32,1",
        help="comma list; the first one is timed cold; batch 1 compiles its own graphs",
    )
    p.add_argument("--prompt", type=int, default=64, help="longest prompt (tokens)")
    p.add_argument("--new", type=int, default=16, help="new tokens per sequence")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="the models' dtype (bf16: weights and activations in bf16)",
    )
    p.add_argument(
        "--ppl",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="held-out perplexity of the shipped model (one more compile: a forward without a "
        "KV cache is another graph)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="what the figures are medians of: wall time, or the thread's CPU time (less noisy "
        "on a shared machine; both are recorded)",
    )
    p.add_argument(
        "--cold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the first generate call with Inductor's caches off (--no-cold: with the "
        "caches as they are; compile_s is then not a cold compile)",
    )
    p.add_argument(
        "--frozen",
        action="store_true",
        help="the capmoe rows' model with capmoe_compile.freeze_experts (packed expert weights)",
    )
    p.add_argument("--quick", action="store_true", help="prompt 16, 6 new tokens, 2 reps")
    p.add_argument("--out", default=None, help="JSON path (benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.reps = 16, 6, 2
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [r for r in args.rows.split(",") if r]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    torch.set_num_threads(args.threads)
    # Every row's compiled forward is the same Python code object (transformers' forward
    # wrapper), and Dynamo's recompile_limit (8) counts its graphs over all rows together:
    # Inductor's and capmoe's three per batch class already make 6, so batch 1 would run
    # uncompiled past the limit, silently. One model served alone stays within it (6 graphs).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    info = machine()
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "generate",
        "machine": info,
        "settings": {
            "prompt": args.prompt,
            "new_tokens": args.new,
            "reps": args.reps,
            "threads": args.threads,
            "batches": args.batches,
            "rows": args.rows,
            "dynamic": True,
            "cold_compile": args.cold,
            "clock": args.clock,
            "recompile_limit": torch._dynamo.config.recompile_limit,
            "dtype": str(DTYPES[args.dtype]).removeprefix("torch."),
            "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        },
        "models": [],
    }
    for name in args.models:
        print(f"generate: {name} ...", file=sys.stderr, flush=True)

        def partial(model_out):
            if args.out:  # result["models"] holds the models finished before this one
                loadavg_end(info)
                models = [*result["models"], model_out]
                write_json(args.out, {**result, "models": models, "partial": True})

        result["models"].append(run_model(name, args, partial))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    loadavg_end(info)
    print(table(result))
    print(
        f"\nload average {info.get('loadavg_start')} at start, {info.get('loadavg_end')} at end; "
        f"{args.threads} thread(s); {args.dtype}; {args.clock} time; {result['seconds']} s"
    )
    if args.out:
        write_json(args.out, result)
    print(json_line({k: v for k, v in result.items() if k != "models"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
