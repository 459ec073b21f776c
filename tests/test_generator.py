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
import torch

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
                router_cap="",  # the router caps have their own cases (ROUTER_CAPS)
                cap="",
            )
        )
    return out


LOOPS = G.LOOPS


EVERY_SPELLING = _cover_every_spelling()
RANDOM = G.specs(4, seed=7)


def _router_caps() -> list[G.LayerSpec]:
    """Issue 23: capacity enforced in the router, each spelling once: binding, moderate (not
    binding on the check's inputs, binding on others), never binding (C = T: dropless).
    ``python -m benchmarks.layer_generator`` draws every spelling with every kind."""
    base = G.specs(1, seed=23)[0]
    base = dataclasses.replace(
        base, dispatch="gather_einsum", E=4, k=2, dtype="float32", dynamic=False, shared=False
    )
    base = dataclasses.replace(
        base, router="softmax_topk" if base.router in G.TOP1 else base.router
    )
    kinds = ("binding", "moderate", "never", "binding")
    return [
        dataclasses.replace(base, router_cap=rc, cap=kinds[i], seed=base.seed + i)
        for i, rc in enumerate(G.ROUTER_CAPS)
    ]


ROUTER_CAPS = _router_caps()


@pytest.mark.parametrize("spec", EVERY_SPELLING + RANDOM + ROUTER_CAPS, ids=lambda s: s.ident)
def test_generated_layer(spec):
    outcome = G.check(spec)
    assert not outcome.wrong, outcome.wrong
    assert not outcome.reference_failed, outcome.reference_failed
    assert not outcome.forbidden_match, "a layer SPEC forbids rewriting was rewritten"
    if not spec.expected_match and not spec.router_cap:
        assert not outcome.matched, "a layer SPEC forbids rewriting was rewritten"


@pytest.mark.parametrize("spec", ROUTER_CAPS, ids=lambda s: s.ident)
def test_router_capacity_binds_as_named(spec):
    """The generator's own router caps (eager, no capmoe): binding drops pairs on the check's
    input, moderate drops none there but does on an input that sends every token to one
    expert, never drops none anywhere; the oracle's expectation follows (SPEC: a cap that can
    bind must be left as written)."""
    layer = G.GeneratedMoE(spec).eval()
    x = layer.example(3, 9, seed=spec.seed)
    layer.calibrate_router_cap([x])
    skewed = layer.example(3, 9, seed=1) * 0 + 10 * layer.direction  # one expert's favourite
    with torch.no_grad():
        for inp, binds in ((x, spec.cap == "binding"), (skewed, spec.cap != "never")):
            xf = inp.reshape(-1, inp.shape[-1])
            _, w_free = layer._route_dropless(inp, xf)
            _, w = layer._route(inp, xf)
            assert bool((w != w_free).any()) == binds, (spec.cap, binds)
    assert spec.expected_match == (spec.cap == "never")


def test_bf16_multilayer_model_and_switches():
    """Issue 23: a bf16 model of two generated layers (one rewritable, one whose router
    enforces its own capacity), capacity off against eager, then every kind of configuration
    switch between calls on the one compiled model: each call follows the new configuration,
    none raises."""
    a, b = G.specs(2, seed=31)
    common = dict(H=16, dtype="bfloat16", dynamic=False, shared=False, E=4, k=2)
    model = G.ModelSpec(
        (
            dataclasses.replace(a, router="softmax_topk", dispatch="gather_einsum", **common),
            dataclasses.replace(
                b,
                router="sigmoid_topk_renorm",
                dispatch="sorted_index_add",
                router_cap="cumsum_flat",
                cap="binding",
                **common,
            ),
        ),
        seed=31,
    )
    on = (("capacity_factor", 0.5), ("policy", "score"))
    steps = [
        G.Step(patch=on),
        G.Step(),  # off again
        G.Step(patch=(("capacity_factor", 1.0), ("policy", "expanded_drop"))),
        G.Step(patch=(("capacity_factor", 0.75), ("policy", "order"), ("renormalize", True))),
        G.Step(patch=on, configure=((0, (("capacity_factor", 1.0), ("policy", "random"))),)),
        G.Step(patch=on, exempt=(0,)),
        G.Step(),
    ]
    outcome = G.check(model, steps=steps, options={"policy": "reroute"})
    assert outcome.layers_matched[1] is False, "the router's own capacity was rewritten"
    assert not outcome.wrong, outcome.wrong
    assert outcome.steps == len(steps)


@pytest.mark.parametrize(
    "spec",
    [s for s in EVERY_SPELLING if s.dispatch == "gather_einsum"][:1],
    ids=lambda s: s.ident,
)
def test_generated_layer_through_inductor(spec):
    """backend="inductor" beside backend="capmoe" (Inductor inside): capacity off within
    max(2 x Inductor's own max |diff| from eager, 1e-5), issue 23's bar."""
    outcome = G.check(spec, inductor=True)
    assert outcome.inductor == "inductor" and outcome.reference_diff is not None
    assert not outcome.wrong, outcome.wrong


def test_sorted_dispatch_of_a_left_layer_is_not_called_its_own_capacity():
    """layer_generator seed 1, case 183: a token-wise top-1 router whose layer is left as
    written (softcap experts), dispatched by an argsort over experts. The probe of the left
    site read ``w[order]`` (rows in expert order, not token order) as routing and reported
    "enforces its own capacity in its router", hiding the real reason."""
    case = G.cases(184, seed=1)[183]
    assert case.ident.startswith("softmax_max_top1-sorted_index_add-softcap")
    outcome = G.check(case, steps=[G.Step(patch=(("capacity_factor", 0.5),))])
    assert not outcome.wrong, outcome.wrong
    assert outcome.reason and "own capacity" not in outcome.reason, outcome.reason
