"""Graphs compiled over a serving-like sequence, every call checked (issue 15).

    python -m benchmarks.serving_graphs [--lengths 3,6,9,13,17] [--batches 3,1,8] [--new 20]

One tiny skewed zoo Mixtral (the model of ``tests/test_generate.py``), compiled in place with
``model.compile(backend="capmoe", dynamic=True)``. For every batch size and prompt length
(left padded, the other prompts shorter), greedy ``generate`` of ``--new`` tokens runs twice
through the compiled model: capacity off, which must equal eager ``generate`` token for token,
and ``score`` at gamma 1.0, which must equal the eager capacity oracle
(``capmoe_compile.testing.serving.CapacityOracle``). Prints a table of the graphs compiled
after each step and a final JSON line; ``--out`` records it. Exits 1 on any mismatch.

The test file runs a shorter sequence (3 lengths, 8 new tokens) against the same bound; this
is the issue's whole sequence, too slow for CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import capmoe_compile as cc
from benchmarks import common
from capmoe_compile import backend
from capmoe_compile.testing import serving, zoo

GAMMA = 1.0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run(lengths: list[int], batches: list[int], new: int) -> dict:
    torch._dynamo.reset()
    eager = zoo.build("mixtral", num_layers=1, seed=5, skew=1.5)
    compiled = copy.deepcopy(eager)
    oracle = serving.CapacityOracle(eager, capacity_factor=GAMMA, policy="score", min_tokens=2)
    before = backend.compile_count()
    compiled.compile(backend="capmoe", dynamic=True)
    rows, mismatches = [], []
    with torch._dynamo.config.patch(recompile_limit=64):
        for B in batches:
            for i, longest in enumerate(lengths):
                prompt = [longest] + [max(1, longest - 2 * j - i) for j in range(1, B)]
                ids, mask = serving.left_padded(prompt, seed=10 * B + i)
                start = time.perf_counter()
                with cc.config.patch(capacity_factor=None):
                    off, _ = serving.greedy(compiled, ids, mask, new)
                with cc.config.patch(capacity_factor=GAMMA, min_tokens=2):
                    on, _ = serving.greedy(compiled, ids, mask, new)
                seconds = time.perf_counter() - start
                ok_off = torch.equal(off, serving.greedy(eager, ids, mask, new)[0])
                ok_on = torch.equal(on, serving.greedy(oracle.model, ids, mask, new)[0])
                if not (ok_off and ok_on):
                    mismatches.append({"batch": B, "lengths": prompt, "off": ok_off, "on": ok_on})
                graphs = backend.compile_count() - before
                rows.append([B, longest, graphs, ok_off, ok_on, round(seconds, 2)])
                print(f"batch {B} longest {longest}: {graphs} graphs", file=sys.stderr)
    headers = ["batch", "longest prompt", "graphs so far", "off == eager", "on == oracle", "s"]
    print(common.fmt_table(headers, rows))
    return {
        "lengths": lengths,
        "batches": batches,
        "new_tokens": new,
        "graphs": backend.compile_count() - before,
        "calls": len(rows) * 2,
        "mismatches": mismatches,
        "rows": [dict(zip(headers, r, strict=True)) for r in rows],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=_ints, default=[3, 6, 9, 13, 17])
    ap.add_argument("--batches", type=_ints, default=[3, 1, 8])
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--out", help="record the JSON here")
    args = ap.parse_args(argv)
    info = common.machine()
    result = run(args.lengths, args.batches, args.new)
    payload = {"meta": common.loadavg_end(info), **result}
    if args.out:
        common.write_json(args.out, payload)
    print(common.json_line(payload))
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
