"""explain names exempt layers and user-facing mask names; configure() on a module with no MoE
layer under it warns (issue 25). One explain of the shipped tiny model (no Inductor)."""

from __future__ import annotations

import warnings

import pytest
import torch

import capmoe_compile as cc


@pytest.fixture(scope="module")
def explained():
    pytest.importorskip("transformers")
    from capmoe_compile.models import load_tiny_moe

    model, _ = load_tiny_moe()
    layers = model.model.layers
    cc.exempt(layers[-1].mlp)
    cc.configure(layers[0].self_attn, capacity_factor=2.0)  # no MoE layer under it
    cc.configure(layers[1], capacity_factor=2.0)  # a decoder layer: its MoE block is under it
    ids = torch.randint(3, 200, (2, 16))
    mask = torch.ones_like(ids)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = cc.explain(model, capacity_factor=1.0)(
                ids, attention_mask=mask, use_cache=False
            )
    finally:
        cc.module_config.clear()
    return report, [str(w.message) for w in caught]


def test_exempt_layer_is_named_exempt(explained):
    report, _ = explained
    rows = {line.split()[0]: line for line in str(report).splitlines()[2:6]}
    last = rows["model.layers.3.mlp"]
    assert " exempt " in last and "exempt (configure/exempt)" in last
    assert "the mask is not [B, S]" not in last
    assert report.call_stats(report.layers[-1]).exempt
    assert not report.call_stats(report.layers[0]).exempt
    assert " exempt " not in rows["model.layers.0.mlp"]


def test_mask_named_as_the_user_passes_it(explained):
    report, _ = explained
    text = str(report)
    assert "padding excluded where attention_mask is [B, S]" in text
    assert "l_kwargs_" not in text and "attention_mask_" not in text


def test_configure_without_moe_layer_warns_once(explained):
    _, caught = explained
    hits = [m for m in caught if "has no MoE layer under it" in m]
    assert len(hits) == 1 and "MixtralAttention" in hits[0], caught


def test_site_of_a_dropped_capture_trial_is_still_reported():
    """A layer whose boolean-mask dispatch leaves data-dependent values no rewrite takes is traced
    again without the capture flags (as Inductor traces it): graph breaks separate its router
    from its experts. explain still lists the site, with the first trace's reason and the retrace."""
    from capmoe_compile.testing import zoo

    torch.manual_seed(0)
    model = zoo.plain_moe("switch_top1").eval()
    x = torch.randn(2, 8, 64)
    rep = cc.explain(model, capacity_factor=1.0)(x)
    assert rep.layers == []
    assert len(rep.unmatched) == 1, rep
    reason = rep.unmatched[0].reason
    assert "traced again without the capture flags" in reason
    assert "no single [T, H] tensor combines" in reason
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="capmoe")(x), model(x))
