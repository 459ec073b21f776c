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
    """Every router with two dispatches and every dispatch with two routers (a cyclic cover of
    router x dispatch: all pairs run in the benchmark), every expert form and every activation
    several times among them (cyclic too), other choices random but seeded. Issue 14's
    spellings are among them: bias-corrected and argmax routers, ``torch.where`` loops over
    stacked and ``nn.ModuleList`` experts, transformers' eager loop over the experts hit (and
    Nemotron-H's), squared ReLU, GPT-OSS clamped interleaved gating, softcapped SwiGLU."""
    rng = random.Random(12)
    out = []
    pairs = [
        (router, G.DISPATCHES[(2 * i + j) % len(G.DISPATCHES)])
        for i, router in enumerate(G.ROUTERS)
        for j in range(2)
    ]
    acts = tuple(G.ACTIVATIONS)
    for i, (router, dispatch) in enumerate(pairs):
        spec = G.random_spec(rng, seed=10_000 + i)
        form = G.FORMS[i % len(G.FORMS)]
        act = "silu" if form in ("gptoss", "softcap") else acts[i % len(acts)]
        # Dynamo unrolls the loops over experts: at most 8 of them keeps each trace short
        E = min(spec.E, 8) if dispatch in LOOPS else spec.E
        out.append(
            dataclasses.replace(
                spec,
                router=router,
                dispatch=dispatch,
                form=form,
                act=act,
                E=E,
                k=1 if router in G.TOP1 else min(spec.k, E // 2),
                dtype="bfloat16" if dispatch == "grouped_mm" else spec.dtype,
            )
        )
    return out


LOOPS = ("expert_loop", "where_loop", "modulelist_where", "hit_loop", "hit_loop_item")


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
