"""Plans measured: the shipped models under expert parallelism with copies, on gloo ranks.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m benchmarks.ep_plan --model tiny \\
        --out benchmarks/results/ep_plan_tiny_n2.json

Runs, for one model and the group's size ``N``, the plans ``benchmarks/plan_sim.py`` wrote
(``python -m benchmarks.plan_sim --ranks N --sweep N``: gammas chosen at ``N`` ranks under
the held-out perplexity budget; ``benchmarks/results/plans/{model}_n{N}_{replicas,capacity,
both}.json``) and the baseline
(``E / N`` contiguous experts a rank, capacity off), each through
``expert_parallel(model, placement=plan)`` with the plan's capacity factor per layer
(``capmoe_compile.configure``, policy ``score``), on the held-out windows of
``plan_sim`` (each call: ``--batch`` windows split evenly over the ranks, so the group routes
the same ``batch * seq`` tokens a call as the simulator). Per plan:

- held-out perplexity (NLL summed over the ranks' windows);
- per MoE layer call (``distributed.record_timings``): rows each rank's copies computed, the
  layer's wall time (slowest rank) and its compute part;
- modeled speedup: baseline's sum over layer calls of the most loaded rank's rows over the
  plan's (the rows are measured, so this is the simulator's figure on these very calls);
- measured speedups: baseline's summed layer time over the plan's, for the whole layer
  (collectives, routing, compute) and for the compute part of the slowest rank.

The graphs are the capmoe passes without Inductor (the EP layer is the opaque
``capmoe::ep_moe`` op either way; plans with copies always take it). Configurations run
``--rounds`` times interleaved; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

SETUPS = ("baseline", "replicas", "capacity", "both")


def passes_only(gm, example_inputs):
    from capmoe_compile.passes import run_passes

    run_passes(gm, example_inputs, {})
    return gm.forward


def _backend():
    from capmoe_compile.bridge import capture_context

    passes_only.backend_ctx_ctor = capture_context
    return passes_only


def _model(name):
    from capmoe_compile.models import load_balanced_moe, load_tiny_moe

    return (load_balanced_moe if name == "balanced" else load_tiny_moe)()[0]


def _setup(model_name, n, setup, plan_dir):
    """(placement per layer, gamma per layer) of one setup."""
    from capmoe_compile.plan import Plan
    from capmoe_compile.replicas import Placement

    p = Plan.load(
        os.path.join(plan_dir, f"{model_name}_n{n}_{'both' if setup == 'baseline' else setup}.json")
    )
    if setup == "baseline":
        E = p.placement(next(iter(p.layers))).num_experts
        return {name: (Placement.identity(E, n), None) for name in p.layers}
    return {name: (p.placement(name), p.layers[name]["capacity_factor"]) for name in p.layers}


def run_setup(model_name, setup, layers, held, batch, rank, world):
    import capmoe_compile as cc
    from capmoe_compile.distributed import expert_parallel, record_timings

    model = _model(model_name).eval()
    per = batch // world
    example = held[:per]
    expert_parallel(
        model,
        example_inputs={"input_ids": example, "use_cache": False},
        placement={n: pl for n, (pl, _) in layers.items()},
    )
    for name, (_, gamma) in layers.items():
        cc.configure(model.get_submodule(name), capacity_factor=gamma, policy="score")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    nll, count = 0.0, 0
    calls = []
    with torch.no_grad():
        compiled(example, use_cache=False)  # compile outside the timed calls
        for i in range(0, held.shape[0], batch):
            x = held[i + rank * per : i + (rank + 1) * per]
            with record_timings() as tm:
                logits = compiled(x, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
            calls += [[t.recv_rows, t.total_s, t.compute_s, t.comm_s, t.route_s] for t in tm]
    mine = torch.tensor(calls, dtype=torch.float64)  # [layer calls, 5]
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    g = torch.stack(every)  # [ranks, layer calls, 5]
    tot = torch.tensor([nll, count], dtype=torch.float64)
    dist.all_reduce(tot)
    rows = g[:, :, 0]
    return {
        "perplexity": math.exp(float(tot[0] / tot[1])),
        "max_rank_rows": float(rows.amax(0).sum()),
        "rows": float(rows.sum()),
        "layer_s": float(g[:, :, 1].amax(0).sum()),
        "compute_s": float(g[:, :, 2].amax(0).sum()),
        "comm_s": float(g[:, :, 3].amax(0).sum()),
        "route_s": float(g[:, :, 4].amax(0).sum()),
        "gamma": {n: gamma for n, (_, gamma) in layers.items()},
        "copies": {n: pl.num_copies for n, (pl, _) in layers.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "balanced"))
    ap.add_argument("--plan-dir", default="benchmarks/results/plans")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    from capmoe_compile.models import split_validation, stdlib_corpus, validation_windows

    _, held_part = split_validation(stdlib_corpus())
    held = validation_windows(held_part, args.seq, args.windows - args.windows % args.batch)
    setups = {s: _setup(args.model, world, s, args.plan_dir) for s in SETUPS}
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
    for r in range(args.rounds):
        for s in SETUPS:
            runs[s].append(run_setup(args.model, s, setups[s], held, args.batch, rank, world))
            if rank == 0:
                x = runs[s][-1]
                print(
                    f"[{time.perf_counter() - t0:6.1f}s] round {r} {s:9s} ppl {x['perplexity']:.4f}"
                    f" max-rank rows {x['max_rank_rows']:.0f} layer {x['layer_s']:.3f}s"
                    f" compute {x['compute_s']:.3f}s",
                    flush=True,
                )
    med = {
        s: {k: (statistics.median(r[k] for r in v) if isinstance(v[0][k], float) else v[0][k])
            for k in v[0]}
        for s, v in runs.items()
    }  # fmt: skip
    base = med["baseline"]
    summary = {}
    for s in SETUPS:
        m = med[s]
        summary[s] = {
            "ppl_change": m["perplexity"] / base["perplexity"] - 1,
            "modeled_speedup": base["max_rank_rows"] / m["max_rank_rows"],
            "measured_speedup": base["layer_s"] / m["layer_s"],
            "measured_compute_speedup": base["compute_s"] / m["compute_s"],
        }
        summary[s]["measured_over_modeled"] = (
            summary[s]["measured_speedup"] / summary[s]["modeled_speedup"]
        )
    if rank == 0:
        out = {
            "benchmark": "ep_plan",
            "model": args.model,
            "ranks": world,
            "cores": os.cpu_count(),
            "oversubscribed": world > (os.cpu_count() or 1),
            "threads_per_rank": torch.get_num_threads(),
            "windows": int(held.shape[0]),
            "batch": args.batch,
            "seq": args.seq,
            "rounds": args.rounds,
            "median": med,
            "summary": summary,
            "runs": runs,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        from benchmarks.common import with_isa

        with open(args.out, "w") as f:
            json.dump(with_isa(out), f, indent=1)
        for s in SETUPS:
            x = summary[s]
            print(
                f"{args.model} N={world} {s:9s} ppl {x['ppl_change']:+.3%} modeled "
                f"{x['modeled_speedup']:.3f} measured {x['measured_speedup']:.3f} "
                f"(compute {x['measured_compute_speedup']:.3f}) ratio "
                f"{x['measured_over_modeled']:.2f}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
