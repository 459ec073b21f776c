"""What batch-invariant expert arithmetic costs (``capmoe_compile/lowering/invariant.py``).

    python -m benchmarks.batch_invariance [--repeats 7] [--out benchmarks/results/batch_invariance_cpu.json]

The expert half of the MoE layer (``lowering.grouped.moe_experts_grouped``, the path compiled
models run) at the moe_layer benchmark's prefill and decode shapes, fp32, on a skewed router:
the fastest GEMMs (``tile=None``, what ``capacity_scope="batch"`` runs) against fixed
``TILE``-row GEMMs (what ``capacity_scope="sequence"`` and ``batch_invariant=True`` run).
Interleaved, medians; prints a table and a final JSON line. The ratio is the price of outputs
that are bit-identical across batchings (tests/test_serving.py).
"""

from __future__ import annotations

import argparse

import torch

from capmoe_compile.experts import TILE, ExpertForm
from capmoe_compile.lowering.grouped import moe_experts_grouped

from .common import fmt_table, interleaved, json_line, machine, median, write_json

SHAPES = {
    "prefill": dict(T=2048, H=1024, F=2048, E=8, k=2),
    "decode": dict(T=16, H=1024, F=2048, E=8, k=2),
}
SWIGLU = ExpertForm(roles=("gate_up", "down"), act="silu")


def _layer(T, H, F, E, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    params = [
        torch.randn(E, 2 * F, H, generator=gen) / H**0.5,
        torch.randn(E, H, F, generator=gen) / F**0.5,
    ]
    skew = torch.linspace(2.0, 0.0, E)  # trained routers favour a few experts
    w, ids = torch.softmax(torch.randn(T, E, generator=gen) + skew, -1).topk(k, -1)
    return x, ids, w, params


def measure(name: str, repeats: int, tile_rows: int = TILE) -> dict:
    x, ids, w, params = _layer(**SHAPES[name])
    tile = torch.tensor(tile_rows)
    runs = {
        "fastest": lambda: moe_experts_grouped(x, ids, w, params, SWIGLU),
        "invariant": lambda: moe_experts_grouped(x, ids, w, params, SWIGLU, tile),
    }
    ms = {key: 1e3 * median(v) for key, v in interleaved(runs, repeats).items()}
    return {
        "shape": name,
        **SHAPES[name],
        "tile": tile_rows,
        "fastest_ms": ms["fastest"],
        "invariant_ms": ms["invariant"],
        "ratio": ms["invariant"] / ms["fastest"],
    }


def row_classes(K: int = 1024, N: int = 2048, seed: int = 0) -> list[list[int]]:
    """Row counts M grouped by whether the first two rows of ``x[:M] @ W`` come out with the
    same bits: one class means the GEMM is row-invariant at this size on this machine."""
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(K, N, generator=gen), torch.randn(4096, K, generator=gen)
    classes: list[tuple[torch.Tensor, list[int]]] = []
    for m in (2, 3, 4, 8, 12, 16, 32, 64, 128, 256, 1024, 4096):
        rows = (x[:m] @ w)[:2]
        for ref, ms in classes:
            if torch.equal(ref, rows):
                ms.append(m)
                break
        else:
            classes.append((rows, [m]))
    return [ms for _, ms in classes]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tile", type=int, default=TILE, help="rows per tile (default: TILE)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = [measure(name, args.repeats, args.tile) for name in SHAPES]
    table = [[r["shape"], r["fastest_ms"], r["invariant_ms"], r["ratio"]] for r in rows]
    print(fmt_table(["shape", "fastest ms", f"tile={args.tile} ms", "ratio"], table))
    classes = row_classes()
    print(f"row-count classes of x[:M] @ W (W 1024x2048, same bits within a class): {classes}")
    result = {"machine": machine(), "row_classes_1024x2048": classes, "rows": rows}
    if args.out:
        write_json(args.out, result)
    print(json_line(result))
    return result


if __name__ == "__main__":
    main()
