"""Batch-invariant expert arithmetic (capmoe_compile/lowering/invariant.py).

Two properties: the tiled GEMM computes the same products as ``torch._grouped_mm`` (to
rounding), and a row's result is bit-identical whatever the size of its expert's group and
wherever it sits in it. The end-to-end property (a sequence's compiled logits alone and
batched) is in test_serving.py.
"""

from __future__ import annotations

import pytest
import torch

from capmoe_compile import config
from capmoe_compile.experts import TILE, ExpertForm, moe_experts_reference
from capmoe_compile.lowering.grouped import moe_experts_grouped
from capmoe_compile.lowering.invariant import tiled_grouped_mm

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _per_expert(a, b, offs):
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end].double().mm(b[e].double()).float()
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [1, 5, TILE])
@pytest.mark.parametrize("seed", range(4))
def test_tiled_grouped_mm_matches_per_expert_products(dtype, tile, seed):
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 9, (), generator=gen))
    K, N = (int(v) for v in torch.randint(1, 80, (2,), generator=gen))
    # group sizes: empty groups, groups of one row, groups longer than a tile
    counts = torch.randint(0, 2 * TILE + 3, (E,), generator=gen)
    counts[torch.rand(E, generator=gen) < 0.3] = 0
    dropped = int(torch.randint(0, 5, (), generator=gen))
    M = int(counts.sum()) + dropped
    a = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(E, N, K, generator=gen).to(dtype).transpose(-2, -1)  # Linear storage
    offs = counts.cumsum(0).to(torch.int32)
    got = tiled_grouped_mm(a, b, offs, tile)
    assert got.shape == (M, N) and got.dtype == dtype
    want = _per_expert(a.float(), b.float(), offs)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    assert not got[M - dropped :].any()  # rows past the last offset: dropped pairs, zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(64, 128), (1024, 512)])
def test_row_result_does_not_depend_on_its_group(dtype, K, N):
    """One row, placed at different positions of groups of 1 to 3*TILE rows among other
    experts' groups: its output row is the same bits every time."""
    gen = torch.Generator().manual_seed(0)
    E = 3
    b = torch.randn(E, K, N, generator=gen).to(dtype)
    row = torch.randn(1, K, generator=gen).to(dtype)
    results = []
    for size, pos, before in [(1, 0, 0), (2, 1, 5), (TILE, 17, 0), (3 * TILE, 150, 40), (7, 6, 1)]:
        group = torch.randn(size, K, generator=gen).to(dtype)
        group[pos] = row[0]
        other = torch.randn(before, K, generator=gen).to(dtype)
        a = torch.cat([other, group, torch.randn(3, K, generator=gen).to(dtype)])
        offs = torch.tensor([before, before + size, before + size + 3], dtype=torch.int32)
        results.append(tiled_grouped_mm(a, b, offs, TILE)[before + pos])
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_tile_must_be_positive():
    a, b = torch.randn(2, 4), torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="tile"):
        tiled_grouped_mm(a, b, torch.tensor([2], dtype=torch.int32), 0)


SWIGLU = ExpertForm(roles=("gate_up", "down"), act="silu")


def _experts(E, H, F, gen):
    gate_up = torch.randn(E, 2 * F, H, generator=gen) / H**0.5
    down = torch.randn(E, H, F, generator=gen) / F**0.5
    return [gate_up, down]


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (9, 8, 2), (70, 4, 3)])
def test_grouped_and_reference_paths_with_tiles_match_reference(T, E, k):
    gen = torch.Generator().manual_seed(T)
    H, F = 16, 24
    params = _experts(E, H, F, gen)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E + 1, generator=gen)[:k] for _ in range(T)])  # E: dropped
    w = torch.rand(T, k, generator=gen)
    want = moe_experts_reference(x, ids, w, params, SWIGLU)
    tile = torch.tensor(TILE)
    got = moe_experts_grouped(x, ids, w, params, SWIGLU, tile)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        moe_experts_reference(x, ids, w, params, SWIGLU, tile=5), want, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("path", ["grouped", "reference"])
def test_token_output_does_not_depend_on_other_tokens(path):
    """The layer-level property: a token's output (same routing) is the same bits whether the
    call holds it alone or with many tokens that share its experts."""
    gen = torch.Generator().manual_seed(1)
    E, H, F, k = 4, 32, 48, 2
    params = _experts(E, H, F, gen)

    def run(x, ids, w):
        if path == "grouped":
            return moe_experts_grouped(x, ids, w, params, SWIGLU, torch.tensor(TILE))
        return moe_experts_reference(x, ids, w, params, SWIGLU, tile=TILE)

    x0, ids0, w0 = torch.randn(1, H, generator=gen), torch.tensor([[1, 2]]), torch.rand(1, k)
    alone = run(x0, ids0, w0)
    for T in (2, 9, 150):
        x = torch.cat([torch.randn(T, H, generator=gen), x0])
        ids = torch.cat([torch.randint(0, E, (T, k), generator=gen), ids0])
        w = torch.cat([torch.rand(T, k, generator=gen), w0])
        assert torch.equal(run(x, ids, w)[-1], alone[0])


def test_batch_invariant_knob_is_validated():
    with pytest.raises(ValueError, match="batch_invariant"):
        config.patch(batch_invariant="yes")
    with config.patch(batch_invariant=True):
        assert config.batch_invariant is True
