"""capmoe_compile.config and capmoe_compile.module_config: validation, patching, precedence."""

from __future__ import annotations

import math

import pytest
from torch import nn

from capmoe_compile import config, module_config


@pytest.fixture(autouse=True)
def _clean_config():
    before = config.snapshot()
    yield
    for name, value in before.items():
        setattr(config, name, value)
    module_config.clear()


def test_defaults():
    assert dict(config.KNOBS) == {
        "capacity_factor": None,
        "policy": "score",
        "local_experts": None,
        "renormalize": False,
        "reroute_rounds": 1,
        "seed": 0,
        "min_tokens": 2,
        "min_capacity": 1,
        "capacity_align": 1,
        "capacity_scope": "batch",
        "exclude_padding": True,
        "batch_invariant": False,
    }
    assert config.snapshot() == dict(config.KNOBS)


@pytest.mark.parametrize(
    "name, value",
    [
        ("capacity_factor", 0),
        ("capacity_factor", -1.0),
        ("capacity_factor", math.nan),
        ("capacity_factor", math.inf),
        ("capacity_factor", "1.0"),
        ("capacity_factor", True),
        ("policy", "drop"),
        ("policy", None),
        ("local_experts", []),
        ("local_experts", [0, 0]),
        ("local_experts", [-1]),
        ("local_experts", [1.5]),
        ("local_experts", [True]),
        ("local_experts", "01"),
        ("local_experts", 3),
        ("renormalize", 1),
        ("exclude_padding", "yes"),
        ("reroute_rounds", -1),
        ("reroute_rounds", 1.0),
        ("seed", -1),
        ("seed", "0"),
        ("min_tokens", -1),
        ("min_capacity", 0),
        ("capacity_align", 0),
        ("capacity_scope", "global"),
    ],
)
def test_validate_rejects(name, value):
    with pytest.raises(ValueError, match=name):
        config.validate(name, value)
    with pytest.raises(ValueError, match=name):
        setattr(config, name, value)
    with pytest.raises(ValueError, match=name):
        config.patch({name: value})
    assert config.snapshot() == dict(config.KNOBS)


def test_error_messages_list_allowed_values():
    with pytest.raises(ValueError) as info:
        config.validate("policy", "tokendrop")
    for policy in config.POLICIES:
        assert repr(policy) in str(info.value)
    with pytest.raises(ValueError, match="'batch', 'sequence'"):
        config.validate("capacity_scope", "x")
    with pytest.raises(ValueError, match="> 0"):
        config.validate("capacity_factor", 0)


def test_unknown_option_suggests():
    with pytest.raises(ValueError, match="Did you mean 'capacity_factor'") as info:
        config.validate("capcity_factor", 1.0)
    assert "min_capacity" in str(info.value)  # lists the known options
    with pytest.raises(ValueError, match="Did you mean 'policy'"):
        config.policyy = "score"
    with pytest.raises(ValueError, match="unknown"):
        config.resolve({"bogus": 1})
    with pytest.raises(ValueError, match="unknown"):
        module_config.configure(nn.Linear, bogus=1)


def test_validate_normalises():
    assert config.validate("capacity_factor", 2) == 2.0
    assert isinstance(config.validate("capacity_factor", 2), float)
    assert config.validate("capacity_factor", None) is None
    assert config.validate("local_experts", [3, 1, 2]) == (1, 2, 3)
    assert config.validate("local_experts", range(2)) == (0, 1)
    assert config.validate("local_experts", None) is None
    assert config.validate("reroute_rounds", 0) == 0
    assert config.validate("min_tokens", 0) == 0
    for policy in config.POLICIES:
        assert config.validate("policy", policy) == policy


def test_assignment_validates_and_bumps():
    v = config.version()
    config.capacity_factor = 1
    assert config.capacity_factor == 1.0 and config.version() > v
    config.local_experts = [2, 0]
    assert config.local_experts == (0, 2)
    with pytest.raises(AttributeError):
        del config.policy


def test_patch_context_manager_restores_and_nests():
    v0 = config.version()
    with config.patch(capacity_factor=1.5, policy="order") as p:
        assert p is not None
        assert (config.capacity_factor, config.policy) == (1.5, "order")
        v1 = config.version()
        assert v1 > v0
        with config.patch({"policy": "reverse"}, seed=3):
            assert (config.capacity_factor, config.policy, config.seed) == (1.5, "reverse", 3)
        assert (config.policy, config.seed) == ("order", 0)
        assert config.version() > v1
    assert config.snapshot() == dict(config.KNOBS)
    assert config.version() > v1


def test_patch_restores_on_exception():
    with pytest.raises(KeyError):
        with config.patch(capacity_factor=2.0):
            raise KeyError
    assert config.capacity_factor is None


def test_patch_decorator():
    @config.patch(policy="random", seed=7)
    def run(depth: int) -> tuple[str, int]:
        if depth:
            return run(depth - 1)  # re-entrant use of the same patch object
        return config.policy, config.seed

    assert run(2) == ("random", 7)
    assert config.policy == "score" and config.seed == 0

    @config.patch(capacity_factor=1.0)
    def boom() -> None:
        raise RuntimeError

    with pytest.raises(RuntimeError):
        boom()
    assert config.capacity_factor is None


def test_patch_reuse_as_context_manager():
    p = config.patch(min_tokens=5)
    with p:
        with p:
            assert config.min_tokens == 5
        assert config.min_tokens == 5
    assert config.min_tokens == 2


def test_resolve_precedence():
    config.capacity_factor = 1.0
    config.policy = "order"
    cfg = config.resolve({"policy": "reroute", "local_experts": [1, 0]})
    assert cfg["capacity_factor"] == 1.0  # from config
    assert cfg["policy"] == "reroute"  # options win
    assert cfg["local_experts"] == (0, 1)  # normalised
    assert cfg["seed"] == 0  # default
    assert config.resolve(None) == config.snapshot()
    assert config.policy == "order"  # resolve changes nothing
    with pytest.raises(ValueError, match="capacity_factor"):
        config.resolve({"capacity_factor": 0})


class _MoE(nn.Module):
    pass


class _SubMoE(_MoE):
    pass


def test_configure_class_instance_precedence():
    a, b = _SubMoE(), _SubMoE()
    v = config.version()
    assert module_config.configure(_MoE, capacity_factor=2.0, policy="order") is _MoE
    assert config.version() > v
    module_config.configure(_SubMoE, policy="reverse")
    module_config.configure(a, policy="random", seed=4)
    assert module_config.options_for(a) == {
        "capacity_factor": 2.0,
        "policy": "random",
        "seed": 4,
    }
    assert module_config.options_for(b) == {"capacity_factor": 2.0, "policy": "reverse"}
    assert module_config.options_for(_MoE()) == {"capacity_factor": 2.0, "policy": "order"}
    assert module_config.options_for(_SubMoE) == {"capacity_factor": 2.0, "policy": "reverse"}
    assert module_config.options_for(nn.Linear(1, 1)) == {}

    module_config.clear(a)
    assert module_config.options_for(a) == module_config.options_for(b)
    module_config.clear(_SubMoE)
    assert module_config.options_for(b) == {"capacity_factor": 2.0, "policy": "order"}
    module_config.clear()
    assert module_config.options_for(b) == {}


def test_configure_decorator_and_validation():
    @module_config.configure(capacity_factor=1.25, local_experts=[1, 0])
    class Layer(nn.Module):
        pass

    assert isinstance(Layer, type)
    assert module_config.options_for(Layer()) == {
        "capacity_factor": 1.25,
        "local_experts": (0, 1),
    }
    with pytest.raises(ValueError, match="capacity_factor"):
        module_config.configure(Layer(), capacity_factor=-1)
    with pytest.raises(TypeError):
        module_config.configure(object(), capacity_factor=1.0)
    with pytest.raises(TypeError):
        module_config.configure(int, capacity_factor=1.0)


def test_exempt():
    module_config.configure(_MoE, capacity_factor=2.0)
    layer = _MoE()
    assert module_config.exempt(layer) is layer
    assert module_config.options_for(layer) == {"capacity_factor": None}
    module_config.exempt(_SubMoE)
    assert module_config.options_for(_SubMoE())["capacity_factor"] is None


def test_instance_overrides_are_weak():
    import gc

    layer = _MoE()
    module_config.configure(layer, seed=1)
    assert len(module_config._by_instance) == 1
    del layer
    gc.collect()
    assert not module_config._by_instance


def test_options_outranking_config_warns_once_naming_both():
    """issue 23: options= silently outranked a config.patch; now a warning names both, once
    per knob and pair of values, and only where a value set in config is outranked."""
    import warnings

    import torch

    from capmoe_compile import pipeline

    pipeline._WARNED_OUTRANKED.clear()
    w = nn.Parameter(torch.zeros(4, 2))
    handle = pipeline.LayerHandle("moe", 4, 2, {"capacity_factor": 1, "seed": 3}, [w], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert handle.options()["capacity_factor"] == 1.0  # config at its default: silent
        with config.patch(capacity_factor=1.0, policy="order"):  # same value, other knob
            assert handle.options()["policy"] == "order"
    with config.patch(capacity_factor=1.25):
        with pytest.warns(UserWarning) as got:
            assert handle.options()["capacity_factor"] == 1.0  # options= wins
        (msg,) = [str(r.message) for r in got]
        assert "options={'capacity_factor': 1.0}" in msg and "capacity_factor=1.25" in msg
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config.seed = 0  # a new version: resolved again, the same pair warns no more
            handle.options()
    config.seed = 5  # another knob outranked: its own warning
    with pytest.warns(UserWarning, match=r"options=\{'seed': 3\}.*seed=5"):
        handle.options()


def test_width_padding_without_dynamo_guard():
    """A graph compiled for a wider selection (expanded_drop) that runs a width-k policy
    outside Dynamo pads with dropped pairs (expert E, weight 0); one compiled for width k
    that is asked for expanded_drop raises (under torch.compile a guard recompiles instead)."""
    import torch

    from capmoe_compile import ops, pipeline

    E, k, T = 4, 2, 12
    w = nn.Parameter(torch.zeros(E, 2))
    layer = pipeline.register_layer(pipeline.LayerHandle("moe", E, k, {}, [w], []))
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(T, E, generator=g), -1)
    weights, ids = probs.topk(k, -1)
    with config.patch(capacity_factor=0.5):
        got_ids, got_w, _ = ops.route_layer(probs, ids, weights, layer, E, 1, None, w)
        want_ids, want_w, _ = ops.route_layer(probs, ids, weights, layer, k, 1, None, w)
    assert got_ids.shape == (T, E)
    assert torch.equal(got_ids[:, :k], want_ids) and torch.equal(got_w[:, :k], want_w)
    assert (got_ids[:, k:] == E).all() and (got_w[:, k:] == 0).all()
    with config.patch(capacity_factor=0.5, policy="expanded_drop"):
        with pytest.raises(RuntimeError, match="outside torch.compile"):
            ops.route_layer(probs, ids, weights, layer, k, 1, None, w)
