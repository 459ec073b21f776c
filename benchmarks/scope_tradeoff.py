"""Batch vs sequence capacity scope on the skewed zoo model: what batch invariance costs.

    python -m benchmarks.scope_tradeoff [--out benchmarks/results/scope_tradeoff.json]

For gamma in {1.0, 1.25} and both scopes, runs a right-padded batch of sequences of different
lengths through the compiled model (padding excluded) and reports, summed over MoE layers:
pairs dropped (and their share), the mean modeled expert-parallel speedup
(max_load_before / max_load_after, SPEC.md), and the mean max/mean load after capacity.
Deterministic for fixed seeds: no timing.
"""

from __future__ import annotations

import argparse
import json

import torch

import capmoe_compile as cc
from benchmarks.common import with_isa
from capmoe_compile.testing import zoo


def run(batch: int = 8, seq: int = 64, seed: int = 0) -> list[dict]:
    model = zoo.build("mixtral", seed=seed, skew=1.5)
    ids = zoo.random_input_ids(model, batch, seq, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    compiled = torch.compile(model, backend="capmoe")
    rows = []
    with torch.no_grad():
        for gamma in (1.0, 1.25):
            for scope in ("batch", "sequence"):
                with cc.config.patch(capacity_factor=gamma, capacity_scope=scope):
                    with cc.record_stats() as st:
                        compiled(ids, attention_mask=mask)
                pairs = sum(int(s.loads_before.sum()) for s in st.layers)
                dropped = sum(s.dropped for s in st.layers)
                rows.append(
                    {
                        "gamma": gamma,
                        "scope": scope,
                        "tokens": st.layers[0].tokens,
                        "dropped": dropped,
                        "dropped_share": dropped / pairs,
                        "modeled_speedup": sum(s.modeled_speedup for s in st.layers)
                        / len(st.layers),
                        "imbalance_after": sum(s.imbalance_after for s in st.layers)
                        / len(st.layers),
                        "imbalance_before": sum(s.imbalance_before for s in st.layers)
                        / len(st.layers),
                    }
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    args = p.parse_args()
    rows = run()
    print(
        f"{'gamma':>5} {'scope':<9} {'tokens':>6} {'dropped':>8} {'share':>6} "
        f"{'max/mean before':>15} {'after':>6} {'EP speedup':>10}"
    )
    for r in rows:
        print(
            f"{r['gamma']:>5} {r['scope']:<9} {r['tokens']:>6} {r['dropped']:>8} "
            f"{r['dropped_share']:>6.1%} {r['imbalance_before']:>15.2f} "
            f"{r['imbalance_after']:>6.2f} {r['modeled_speedup']:>9.2f}x"
        )
    result = {"benchmark": "scope_tradeoff", "model": "zoo mixtral skew=1.5", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(with_isa(result), f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
