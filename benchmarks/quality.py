"""Quality vs modeled speed: the capacity trade-off table on the shipped tiny MoE LM.

    python -m benchmarks.quality [--out benchmarks/results/quality.json] [--windows 512]

Compiles the model once with ``backend="capmoe"`` (static shape ``[batch, seq]``), then for
gamma in {off, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5} x every policy of SPEC.md runs the held-out
validation windows (files of the Python standard library the model never trained on) and
reports, per cell:

- perplexity (per byte) and next-token accuracy, and the perplexity change against "off";
- pairs dropped (and added, for ``expanded_drop`` / ``reroute``) as a share of the model's own
  ``T * k`` pairs;
- max/mean expert load after capacity (mean over layers and calls);
- the modeled expert-parallel speedup of the MoE layers: the sum over layers and calls of
  ``max_load_before`` over the same sum of ``max_load_after`` (SPEC.md's figure, at equal
  per-token expert cost; attention and everything else excluded).

Capacity is per call (``capacity_scope="batch"``, the paper's): ``T = batch * seq`` tokens.
Prints a progress bar (tqdm when installed), the table, and one final JSON line; ``--out``
also writes the JSON (with per-layer mean loads per call, for ``capmoe report``).
Deterministic: no timing is measured, one CPU thread by default. The sweep itself is
``capmoe_compile.tools.sweep`` (``capmoe sweep``, for a wheel install); this module runs it
with the benchmark's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks.common import with_isa
from capmoe_compile.tools import sweep as _sweep
from capmoe_compile.tools.sweep import (  # noqa: F401 - this module's names since it began
    GAMMAS,
    describe,
    evaluate_cell,
    format_table,
)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is optional

        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Plain()


def run(*, progress: bool = True, **kwargs) -> dict:
    """:func:`capmoe_compile.tools.sweep.run` (same keywords), with a progress bar on stderr."""
    bar = None

    def step(done: int, total: int, text: str) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress(total, "quality")
        if done:
            bar.update(1)
            bar.set_postfix_str(text)

    try:
        return _sweep.run(progress=step if progress else None, **kwargs)
    finally:
        if bar is not None:
            bar.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--windows", type=int, default=512, help="held-out windows of --seq bytes (<= 2027)"
    )
    p.add_argument("--gammas", help="comma-separated gammas (default: off,2,1.5,1.25,1,0.75,0.5)")
    p.add_argument(
        "--model", help="tiny (default), balanced (the shipped models), or a model directory"
    )
    p.add_argument("--policies", help="comma-separated subset of policies")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(
        batch=args.batch,
        seq=args.seq,
        windows=args.windows,
        policies=tuple(args.policies.split(",")) if args.policies else None,
        gammas=tuple(None if g == "off" else float(g) for g in args.gammas.split(","))
        if args.gammas
        else GAMMAS,
        model_path=args.model,
    )
    header = describe(result)
    print("\n" + header + "\n")
    print(format_table(result))
    print(
        "\n(ppl: perplexity per byte; dropped / added: share of the model's T*k pairs; "
        "max/mean: expert load after capacity; EP speedup: sum of max loads before / after, "
        "SPEC.md's model)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(with_isa(result), f, indent=1)
            f.write("\n")
        # the table beside it, as printed
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write(header + "\n" + format_table(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
