"""A seeded subset of the layer generator (``capmoe_compile.testing.generator``) in CI.

``python -m benchmarks.layer_generator`` runs thousands; here every router and every dispatch
spelling the generator knows is drawn several times, plus random combinations, and a few go
through Inductor too (each layer is a Dynamo trace, about a second: this is the CI-sized cut). Each must compute what eager computes with capacity off, and what the
SPEC oracle computes with capacity on where capmoe rewrote it; no layer SPEC forbids
rewriting (its own capacity, an unidentified router) may be rewritten.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from capmoe_compile.testing import generator as G


def _cover_every_spelling() -> list[G.LayerSpec]:
    """Every router with two dispatches and every dispatch with two or three routers (a cyclic
    cover of router x dispatch: all 56 pairs run in the benchmark), other choices random but
    seeded."""
    rng = random.Random(12)
    out = []
    pairs = [
        (router, G.DISPATCHES[(i + j) % len(G.DISPATCHES)])
        for i, router in enumerate(G.ROUTERS)
        for j in range(2)
    ]
    for i, (router, dispatch) in enumerate(pairs):
        spec = G.random_spec(rng, seed=10_000 + i)
        k = 1 if router == "softmax_max_top1" else spec.k
        dtype = "bfloat16" if dispatch == "grouped_mm" else spec.dtype
        out.append(dataclasses.replace(spec, router=router, dispatch=dispatch, k=k, dtype=dtype))
    return out


EVERY_SPELLING = _cover_every_spelling()
RANDOM = G.specs(4, seed=7)


@pytest.mark.parametrize("spec", EVERY_SPELLING + RANDOM, ids=lambda s: s.ident)
def test_generated_layer(spec):
    outcome = G.check(spec)
    assert not outcome.wrong, outcome.wrong
    if not spec.expected_match:
        assert not outcome.matched, "a layer SPEC forbids rewriting was rewritten"


@pytest.mark.parametrize(
    "spec",
    [s for s in EVERY_SPELLING if s.dispatch == "gather_einsum"][:2],
    ids=lambda s: s.ident,
)
def test_generated_layer_through_inductor(spec):
    outcome = G.check(spec, inductor=True)
    assert not outcome.wrong, outcome.wrong
