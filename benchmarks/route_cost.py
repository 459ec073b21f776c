"""Cost of the routing op alone, against ``torch.topk`` over the same scores.

    python -m benchmarks.route_cost                          # T in 2k/8k/32k, E in 8/64/256, k=8
    python -m benchmarks.route_cost --Ts 2048 --Es 64 --policies score,order
    python -m benchmarks.route_cost --out benchmarks/results/route_cost_cpu.json

Rows, per (T, E), interleaved round-robin, median of ``--reps`` (one intra-op thread unless
``--threads``: the route op is a chain of small kernels whose cost is per call and per
element, not something two threads on a shared machine measure well):

- ``topk``: ``torch.topk(probs, k)``, what any router already pays: the reference cost;
- ``route <policy>``: ``routing.route_reference`` with ``capacity_factor=1.0`` (what
  ``capmoe::route_layer`` runs for every call once capacity is on);
- ``dense score``: the score policy as it was computed before the pair ranking: every (row,
  expert) cell of the dense ``[G, R, E]`` view ranked by one sort of ``T*E`` keys
  (``routing._rank_rows``); its cost grows with ``T*E``, not with the ``T*k`` selected pairs.

Reported per row: ms, ns per selected pair (``T*k``; flat when the cost scales with the kept
work), and the ratio to ``topk``. Every sample is timed twice: wall clock (``ms``) and the
calling thread's CPU time (``thread_ms``, ``time.thread_time``; with one intra-op thread all
the op's work runs on it): on a loaded shared machine the wall clock also counts the time the
thread was descheduled, the thread time does not. Both are recorded; the table prints both.
"""

from __future__ import annotations

import argparse
import time

import torch

from capmoe_compile import routing

from .common import fmt_table, json_line, loadavg_end, machine, median, write_json


def scores(T: int, E: int, seed: int = 0) -> torch.Tensor:
    """Skewed router probabilities: softmax of noise plus a per-expert offset (0..2)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, 2, E)
    return logits.softmax(-1)


def dense_score(probs, ids, weights, capacity_factor: float = 1.0):
    """The score policy over the dense [1, T, E] view (the formulation before pair ranking)."""
    T, E = probs.shape
    k = ids.shape[1]
    sel = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    cap = routing.capacity(T, E, k, capacity_factor)
    view = (1, T, E)
    keep = sel & (routing._rank_rows(probs.float().view(view), sel.view(view)) < cap).reshape(T, E)
    kept = keep.gather(1, ids)
    return torch.where(kept, ids, E), torch.where(kept, weights, 0.0)


def interleaved_both(rows, reps: int, warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """(wall s, thread CPU s) per call of every row, ``reps`` samples, round-robin."""
    names = list(rows)
    for _ in range(warmup):
        for n in names:
            rows[n]()
    out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            c0, t0 = time.thread_time(), time.perf_counter()
            rows[n]()
            out[n].append((time.perf_counter() - t0, time.thread_time() - c0))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--Ts", default="2048,8192,32768")
    p.add_argument("--Es", default="8,64,256")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--policies", default="score,order,random", help="route_reference policies")
    p.add_argument("--no-dense", action="store_true", help="skip the dense score row")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"# route_cost  {info['date']}  {info['cpu']}  torch {info['torch']}")
    print(f"# threads {info['torch_threads']}/{info['cores']}, load avg {info['loadavg_start']}")
    policies = [s for s in args.policies.split(",") if s]
    results = []
    t_start = time.perf_counter()
    for T in (int(v) for v in args.Ts.split(",")):
        for E in (int(v) for v in args.Es.split(",")):
            k = min(args.k, E)
            probs = scores(T, E)
            w, ids = probs.topk(k, -1)
            rows = {"topk": lambda probs=probs, k=k: probs.topk(k, -1)}
            for pol in policies:
                rows[f"route {pol}"] = lambda pol=pol, probs=probs, ids=ids, w=w: (
                    routing.route_reference(probs, ids, w, capacity_factor=1.0, policy=pol)
                )
            if not args.no_dense:
                rows["dense score"] = lambda probs=probs, ids=ids, w=w: dense_score(probs, ids, w)
                a = routing.route_reference(probs, ids, w, capacity_factor=1.0, policy="score")
                b = dense_score(probs, ids, w)
                if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                    raise RuntimeError(f"T={T} E={E}: pair ranking and dense ranking disagree")
            both = interleaved_both(rows, reps=args.reps, warmup=1)
            top = median([w for w, _ in both["topk"]])
            top_c = median([c for _, c in both["topk"]])
            res = {"T": T, "E": E, "k": k, "rows": {}}
            for name, samples in both.items():
                ts = [w for w, _ in samples]
                cs = [c for _, c in samples]
                m, mc = median(ts), median(cs)
                res["rows"][name] = {
                    "ms": 1e3 * m,
                    "ms_min": 1e3 * min(ts),
                    "ns_per_pair": 1e9 * m / (T * k),
                    "vs_topk": m / top,
                    "thread_ms": 1e3 * mc,
                    "thread_ns_per_pair": 1e9 * mc / (T * k),
                    "thread_vs_topk": mc / top_c,
                    "samples_ms": [1e3 * s for s in ts],
                    "samples_thread_ms": [1e3 * s for s in cs],
                }
            results.append(res)
            print(
                f"\n== T={T} E={E} k={k}\n"
                + fmt_table(
                    ["row", "ms", "min", "ns/pair", "x topk", "thread ms", "ns/pair", "x topk"],
                    [
                        [
                            n,
                            r["ms"],
                            r["ms_min"],
                            r["ns_per_pair"],
                            f"{r['vs_topk']:.2f}x",
                            r["thread_ms"],
                            r["thread_ns_per_pair"],
                            f"{r['thread_vs_topk']:.2f}x",
                        ]
                        for n, r in res["rows"].items()
                    ],
                ),
                flush=True,
            )
    loadavg_end(info)
    payload = {
        "benchmark": "route_cost",
        "args": vars(args),
        "machine": info,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    if args.out:
        write_json(args.out, payload)
        print(f"\n# wrote {args.out}")
    summary = {
        f"T{r['T']}/E{r['E']}/{n}": round(v["ms"], 3) for r in results for n, v in r["rows"].items()
    }
    print(json_line({"benchmark": "route_cost", "ms": summary}))
    return payload


if __name__ == "__main__":
    main()
