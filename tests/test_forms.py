"""Issue 24: expert forms are one registry (``capmoe_compile/forms/``). Each family proposes
its own candidates and computes its own body; nothing outside the registry branches on a
family's or an activation's name; kernels decide from what a form says (its activation,
whether it is its projections alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from source_scan import compares_against

import capmoe_compile
from capmoe_compile import forms
from capmoe_compile.experts import ExpertForm

ROOT = Path(capmoe_compile.__file__).parent


def test_no_branch_on_form_or_activation_names_outside_the_registry():
    names = {f.name for f in forms.families()} | set(forms.ACTIVATIONS)
    hits = compares_against(names, skip=("forms", "testing", "tools"))
    assert not hits, hits


def test_split_modules_fit_600_lines():
    paths = [*(ROOT / "forms").glob("*.py"), *(ROOT / "passes").glob("*.py")]
    long = [f"{p.name}: {n}" for p in paths if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long


def _one_of_each() -> list[ExpertForm]:
    """A candidate of every family, from a layer whose code holds each family's constants."""
    E, H, F = 3, 8, 6
    g = torch.fx.Graph()
    x = g.placeholder("x")
    nodes = [
        g.call_method("clamp", (x,), {"max": 7.0}),
        g.call_function(torch.mul, (x, 1.702)),
        g.call_function(torch.div, (x, 4.0)),
        g.call_function(torch.nn.functional.rms_norm, (x, (H,)), {"eps": 1e-6}),
        g.call_method("bfloat16", (x,)),
    ]
    out = {}
    for vector in (torch.zeros(E, H), torch.zeros(H)):  # per expert, shared by every expert
        params = [torch.zeros(E, 2 * F, H), torch.zeros(E, H, F), vector]
        for f in forms.candidates(params, H, nodes):
            out.setdefault(f.family, f)
    assert set(out) == {f.name for f in forms.families()}, sorted(out)
    return list(out.values())


def test_every_family_proposes_round_trips_and_describes():
    for f in _one_of_each():
        assert ExpertForm.from_str(f.to_str()) == f
        assert f.describe()


def test_a_form_built_by_its_fields_belongs_to_the_family_that_claims_them():
    roles = ("gate_up", "down")
    assert ExpertForm(roles, "silu").family == "mlp"
    assert ExpertForm(roles, "silu", softcap=(4.0, 25.0)).family == "softcap"
    assert ExpertForm(roles, "silu", (), True, True, True, 7.0, 1.702, 1.0).family == "clamped"


def test_only_projection_forms_with_their_own_activation_reach_fused_kernels():
    """A kernel decides from the form: its activation (None where the family computes
    something else between the projections) and whether it is its projections alone."""
    for f in _one_of_each():
        assert f.activation in (None, f.act)
    assert ExpertForm(("gate_up", "down"), "gelu").activation == "gelu"
    assert ExpertForm(("gate_up", "down"), "silu", softcap=(4.0, 25.0)).activation is None
    try:
        from capmoe_compile.lowering import triton_moe
    except ImportError:
        pytest.skip("triton not installed")
    for f in _one_of_each():
        ok = f.projections_only and f.activation in triton_moe._ACT_IDS
        assert triton_moe.supports(f, torch.float32, "cuda") == (ok and triton_moe.HAS_TRITON)


@pytest.mark.parametrize("act", list(forms.ACTIVATIONS))
def test_the_inplace_activation_is_the_activation(act):
    g = torch.randn(64)
    want = forms.ACTIVATIONS[act](g.clone())
    torch.testing.assert_close(forms.apply_inplace(act, g.clone()), want)
