"""The traced epilogue kernel (``capmoe_compile/lowering/epilogue.py``) against the reference
kernel it replaced for experts with a row-wise step after their projections, in one process,
interleaved.

    python -m benchmarks.epilogue_ab --out benchmarks/results/epilogue_ab_<isa>_<date>.json
    python -m benchmarks.epilogue_ab --quick        # small shapes, few reps (smoke run)

The layer is Ergo's (transformers 5.25): softmax top-k, squared-ReLU experts, each output
normalised by an RMSNorm with its expert's own scale, written as plain PyTorch (a loop over
experts with ``index_add_``). Two instances with the same weights are compiled with
``backend="capmoe"`` (capacity off): one while the epilogue kernel is registered, one with it
removed from the registry (so the reference kernel, an opaque op looping over experts, runs
the experts). Their outputs are compared, then timed round-robin with one intra-op thread
(``time.thread_time``), medians and the median of per-round ratios, beside eager.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    fmt_table,
    interleaved,
    isa_line,
    json_line,
    loadavg_end,
    machine,
    median,
    write_json,
)


class ErgoLike(nn.Module):
    def __init__(self, H: int, Fd: int, E: int, k: int):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(H, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, Fd, H) * H**-0.5)
        self.down = nn.Parameter(torch.randn(E, H, Fd) * Fd**-0.5)
        self.norm = nn.Parameter(1.0 + 0.1 * torch.randn(E, H))

    def forward(self, x):
        p = torch.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, pos = torch.where(ids == e)
            y = F.linear(torch.square(F.relu(F.linear(x[tok], self.up[e]))), self.down[e])
            y = (F.rms_norm(y.float(), (y.shape[-1],), eps=1e-5) * self.norm[e].float()).to(x.dtype)
            out.index_add_(0, tok, y * w[tok, pos, None])
        return out


class ErgoLikeReference(ErgoLike):
    """The same layer with a forward of its own code object: Dynamo keeps compiled code per
    code object, so this instance compiles anew (with the registry as it then is) instead of
    reusing the other instance's graph."""


ErgoLikeReference.forward = types.FunctionType(
    ErgoLike.forward.__code__.replace(co_name="forward_reference"),
    ErgoLike.forward.__globals__,
    "forward",
)


def _compiled(model: nn.Module, x: torch.Tensor, with_epilogue: bool):
    """``model`` compiled with capmoe (run once: compiled now, with the registry as it is
    now), and what runs its experts (``explain``)."""
    import capmoe_compile
    from capmoe_compile.lowering import epilogue, kernels

    kernel = next(k for k in kernels.kernels() if k.name == epilogue.NAME)
    if not with_epilogue:
        kernels._KERNELS.remove(kernel)
    try:
        rep = capmoe_compile.explain(model)(x)
        fn = torch.compile(model, backend="capmoe", dynamic=False)
        with torch.no_grad():
            fn(x)
    finally:
        if not with_epilogue:
            kernels.register_kernel(kernel)
    lowering = rep.layers[0].lowering.split(" (")[0] if rep.layers else "not matched"
    return fn, lowering


def _timed(fa, fb, a, x, reps: int) -> dict[str, list[float]]:
    with torch.no_grad():
        rows = {"epilogue": lambda: fa(x), "reference": lambda: fb(x), "eager": lambda: a(x)}
        return interleaved(rows, reps=reps, warmup=2, clock=time.thread_time)


def run(shapes, dtypes, reps: int) -> dict:
    info = machine()
    torch.set_num_threads(1)
    rows_out = []
    for dname in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for T, H, Fd, E, k in shapes:
            torch.manual_seed(0)
            a = ErgoLike(H, Fd, E, k).to(dtype).eval()
            b = ErgoLikeReference(H, Fd, E, k).to(dtype).eval()
            b.load_state_dict(a.state_dict())
            x = torch.randn(T, H).to(dtype)
            torch._dynamo.reset()
            fa, lowering_a = _compiled(a, x, True)
            fb, lowering_b = _compiled(b, x, False)
            with torch.no_grad():
                ya, yb, ye = fa(x), fb(x), a(x)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            row = {
                "dtype": dname, "T": T, "H": H, "F": Fd, "E": E, "k": k,
                "lowering": lowering_a, "lowering_without_epilogue": lowering_b,
                "max_diff_epilogue_vs_reference": float((ya.float() - yb.float()).abs().max()),
                "max_diff_epilogue_vs_eager": float((ya.float() - ye.float()).abs().max()),
            }  # fmt: skip
            assert row["max_diff_epilogue_vs_eager"] <= tol * max(1.0, float(ye.abs().max()))
            assert lowering_a.startswith("traced") and lowering_b == "reference", row
            times = _timed(fa, fb, a, x, reps)
            ratios = [r / e for e, r in zip(times["epilogue"], times["reference"], strict=True)]
            row.update({f"{n}_ms": 1e3 * median(v) for n, v in times.items()})
            row["reference_over_epilogue"] = median(ratios)
            rows_out.append(row)
            print(json_line(row), flush=True)
    payload = {"benchmark": "epilogue_ab", "machine": loadavg_end(info), "rows": rows_out}
    print(isa_line())
    cols = ["dtype", "T", "H", "F", "E", "k", "epilogue_ms", "reference_ms", "eager_ms",
            "reference_over_epilogue"]  # fmt: skip
    print(fmt_table(cols, [[r[c] for c in cols] for r in rows_out]))
    return payload


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    shapes = [(64, 128, 256, 8, 2)] if args.quick else [
        (16, 1024, 1024, 8, 2), (256, 1024, 1024, 8, 2), (1024, 512, 512, 16, 4),
    ]  # fmt: skip
    payload = run(shapes, args.dtypes, 5 if args.quick else args.reps)
    payload["command"] = "python -m benchmarks.epilogue_ab" + (" --quick" if args.quick else "")
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
