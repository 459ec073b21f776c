"""Batch-invariant expert GEMMs: every row's result independent of how many rows share its expert.

A GEMM library picks its kernel by shape: on this project's CPUs (MKL, fp32) a row of
``x[:M] @ W`` differs in the last bits between ``M = 1`` (a GEMV) and ``M >= 2``, and for
larger ``K, N`` again between ``M`` ranges (measured: 2..12, 16..128, >= 256 for 1024 x 2048).
An expert's group size ``M`` depends on what else is in the batch, so a grouped GEMM makes a
sequence's output depend on its neighbours even when its routing does not.

:func:`tiled_grouped_mm` removes that dependence by construction: each expert's rows are cut
into tiles of exactly ``tile`` rows (the last one zero-filled), every tile is copied into the
same buffer and multiplied by one ``torch.mm`` of one shape, ``[tile, K] @ [K, N]``. Every row
then goes through the same kernel, with the same data layout, whatever its group's size, and
its result depends only on itself and the weights. The cost is the padding of each group's
last tile and losing the large-``M`` kernels (``python -m benchmarks.batch_invariance``);
``tests/test_serving.py`` shows the property end to end.

The routing half of batch invariance is ``capacity_scope="sequence"`` (SPEC.md); this module
is the arithmetic half. ``capmoe::route_layer`` decides at run time, per layer, whether a call
needs it (sequence scope, or ``config.batch_invariant``) and hands the tile size to the GEMMs.
"""

from __future__ import annotations

import torch


def tiled_grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, tile: int
) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` computed in fixed ``[tile, K]`` tiles.

    ``a`` is ``[M, K]`` with expert ``e``'s rows at ``offs[e-1]:offs[e]`` (sorted by expert),
    ``b`` is ``[E, K, N]``. Rows past ``offs[-1]`` (dropped pairs) are returned as zeros.
    The group offsets are read on the host: this runs inside an opaque custom op, never as
    traced code, so the compiled graph keeps static shapes.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    M, K = a.shape
    N = b.shape[-1]
    out = a.new_zeros(M, N)
    buf = a.new_empty(tile, K)
    res = a.new_empty(tile, N)
    start = 0
    for e, end in enumerate(offs.tolist()):
        w = b[e]
        for s in range(start, end, tile):
            n = min(tile, end - s)
            buf[:n].copy_(a[s : s + n])
            if n < tile:
                buf[n:].zero_()
            torch.mm(buf, w, out=res)
            out[s : s + n].copy_(res[:n])
        start = end
    return out
