"""The model zoo: every family builds tiny and runs, seeds are deterministic, skew is real."""

import pytest
import torch

from capmoe_compile.testing import zoo

transformers = pytest.importorskip("transformers")

B, S = 2, 16


def _ids(model, seed=3, batch=B, seq=S):
    return zoo.random_input_ids(model, batch=batch, seq=seq, seed=seed)


def _build(family, **kwargs):
    # the other families are checked without skew: no calibration forward, so the slow hybrid
    # ones (linear attention, Mamba on their torch fallbacks) stay cheap
    if family not in zoo.CORE_FAMILIES:
        kwargs.setdefault("skew", None)
    return zoo.build(family, **kwargs)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_builds_and_runs(family):
    model = _build(family)
    assert not model.training
    layers = zoo.moe_layers(model)
    assert layers, "no MoE layer found"
    expected = 2 if family in zoo.CORE_FAMILIES else 1
    assert len(layers) >= expected
    for layer in layers:
        assert layer.num_experts == 8
        assert layer.top_k == 2
    ids = _ids(model)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (B, S, 256)
    assert torch.isfinite(logits).all()
    loads = zoo.expert_loads(model, ids)
    assert set(loads) == {layer.router_path for layer in layers}
    assert all(c.sum().item() == B * S * 2 for c in loads.values())


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_is_deterministic_by_seed(family):
    # built from scratch each time: zoo.build keeps small models and hands out copies
    zoo.clear_build_cache()
    a = _build(family)
    zoo.clear_build_cache()
    b, c = _build(family), _build(family, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    if family in zoo.CORE_FAMILIES:
        ids = _ids(a)
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.clear_build_cache()  # a real build, not a copy of a kept one
    zoo.build("mixtral")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", [*zoo.CORE_FAMILIES, "deepseek_v2", "glm4_moe"])
def test_skewed_routing(family):
    """Skew raises max/mean load well above a random router's, on random tokens."""
    balanced = zoo.build(family, skew=None)
    ids = _ids(balanced, seed=7, batch=4, seq=64)
    skewed = zoo.expert_loads(zoo.build(family), ids)
    plain = zoo.expert_loads(balanced, ids)
    assert skewed.keys() == plain.keys()
    for path, counts in skewed.items():
        assert counts.sum().item() == ids.numel() * 2, path  # T * k pairs
        assert zoo.load_ratio(counts) >= 2.0, (path, counts.tolist())
    mean_skewed = sum(map(zoo.load_ratio, skewed.values())) / len(skewed)
    mean_plain = sum(map(zoo.load_ratio, plain.values())) / len(plain)
    assert mean_skewed > mean_plain


@pytest.mark.parametrize("family", zoo.MAIN_FAMILIES)
@pytest.mark.parametrize("impl", ["batched_mm", "eager"])
def test_experts_implementations_agree(family, impl):
    ref = zoo.build(family, experts_implementation="grouped_mm", skew=None)
    other = zoo.build(family, experts_implementation=impl, skew=None)
    assert other.config._experts_implementation == impl
    ids = _ids(ref)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, ref(ids).logits)


def test_deepseek_v3_router_config_and_bias():
    model = zoo.build("deepseek_v3")
    cfg = model.config
    assert cfg.first_k_dense_replace == 0
    assert cfg.n_group > 1 and 1 <= cfg.topk_group < cfg.n_group
    assert cfg.routed_scaling_factor != 1.0
    layers = zoo.moe_layers(model)
    assert len(layers) == cfg.num_hidden_layers
    ids = _ids(model, batch=4, seq=64)
    for layer in layers:
        bias = layer.router.e_score_correction_bias
        assert bias.abs().min() > 0
    # the bias changes the selection of some tokens
    selected = []

    def hook(module, args, output):
        selected.append(output[2].sort(dim=-1).values)

    router = layers[0].router
    handle = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
            saved = router.e_score_correction_bias.clone()
            router.e_score_correction_bias.zero_()
            model(ids)
            router.e_score_correction_bias.copy_(saved)
    finally:
        handle.remove()
    changed = (selected[0] != selected[1]).any(dim=-1).float().mean().item()
    assert changed > 0.05


def test_qwen2_moe_has_shared_expert():
    model = zoo.build("qwen2_moe")
    block = zoo.moe_layers(model)[0].block
    assert hasattr(block, "shared_expert") and hasattr(block, "shared_expert_gate")
    assert block.gate is zoo.moe_layers(model)[0].router


def test_bf16_build():
    model = zoo.build("mixtral", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(_ids(model)).logits.float()).all()


def test_build_hands_out_copies():
    a = zoo.build("mixtral")
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    b = zoo.build("mixtral")
    assert b is not a and not torch.equal(next(a.parameters()), next(b.parameters()))
    zoo.clear_build_cache()
    sa, sb = b.state_dict(), zoo.build("mixtral").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the copy is the model built afresh
    assert torch.equal(b.zoo_shared_direction, zoo.build("mixtral").zoo_shared_direction)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        zoo.build("not_a_family")


# ----------------------------------------------------------------------------- plain modules


@pytest.mark.parametrize("kind", zoo.PLAIN_KINDS)
def test_plain_moe_runs_and_is_deterministic(kind):
    a, b = zoo.plain_moe(kind), zoo.plain_moe(kind)
    x = zoo.random_hidden(a, batch=B, seq=S, seed=1)
    assert x.shape == (B, S, 64)
    with torch.no_grad():
        y = a(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert torch.equal(y, b(x))
        c = zoo.plain_moe(kind, seed=1)
        assert not torch.equal(y, c(x))


@pytest.mark.parametrize("kind", zoo.PLAIN_KINDS)
def test_plain_moe_skew(kind):
    module = zoo.plain_moe(kind)
    x0 = zoo.random_hidden(module, batch=4, seq=64, seed=5)
    (before,) = zoo.expert_loads(module, x0).values()
    assert zoo.skew_router_(module) is module
    x = zoo.random_hidden(module, batch=4, seq=64, seed=5)
    (after,) = zoo.expert_loads(module, x).values()
    k = zoo.moe_layers(module)[0].top_k
    assert after.sum().item() == x.shape[0] * x.shape[1] * k
    assert zoo.load_ratio(after) >= 2.5 > zoo.load_ratio(before)


def _reference_moe(x, gate_w, w_gate, w_up, w_down, top_k):
    """Dense reference: every expert on every token, softmax -> top-k -> renormalise."""
    t = x.reshape(-1, x.shape[-1])
    probs = (t @ gate_w.t()).softmax(dim=-1)
    val, idx = probs.topk(top_k, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(t)
    for e in range(gate_w.shape[0]):
        y = (torch.nn.functional.silu(t @ w_gate[e]) * (t @ w_up[e])) @ w_down[e]
        out += y * (val * (idx == e)).sum(dim=-1, keepdim=True)
    return out.reshape(x.shape)


def test_plain_top2_kinds_compute_the_same_moe():
    loop = zoo.plain_moe("modulelist_loop")
    stacked = zoo.plain_moe("stacked_bmm")
    w_gate = torch.stack([e.w1.weight.t() for e in loop.experts])
    w_up = torch.stack([e.w3.weight.t() for e in loop.experts])
    w_down = torch.stack([e.w2.weight.t() for e in loop.experts])
    with torch.no_grad():
        stacked.gate.weight.copy_(loop.gate.weight)
        stacked.w_gate.copy_(w_gate)
        stacked.w_up.copy_(w_up)
        stacked.w_down.copy_(w_down)
        x = zoo.random_hidden(loop, batch=B, seq=S, seed=2)
        ref = _reference_moe(x, loop.gate.weight, w_gate, w_up, w_down, 2)
        torch.testing.assert_close(loop(x), ref)
        torch.testing.assert_close(stacked(x), ref)


def test_switch_top1_matches_reference():
    m = zoo.plain_moe("switch_top1")
    x = zoo.random_hidden(m, batch=B, seq=S, seed=2)
    with torch.no_grad():
        t = x.reshape(-1, x.shape[-1])
        gate, idx = m.router(t).softmax(dim=-1).max(dim=-1)
        ref = torch.stack([m.experts[int(e)](row) for row, e in zip(t, idx, strict=True)])
        ref = (ref * gate[:, None]).reshape(x.shape)
        torch.testing.assert_close(m(x), ref)


def test_expert_loads_matches_manual_count():
    model = zoo.build("olmoe")
    ids = _ids(model)
    loads = zoo.expert_loads(model, ids)
    captured = {}
    for layer in zoo.moe_layers(model):
        layer.router.register_forward_hook(
            lambda mod, a, out, p=layer.router_path: captured.__setitem__(p, out[2])
        )
    with torch.no_grad():
        model(ids)
    for path, idx in captured.items():
        assert torch.equal(loads[path], torch.bincount(idx.flatten(), minlength=8))
