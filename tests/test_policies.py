"""The policy registry (issue 24): a policy is one ``routing.Policy`` registered by name, and
the rest of the project (config validation, ``route``, the compiled op) takes it from there.

The new policy here ("least": keep each expert's pairs of *smallest* probability) exists only
in this test; its expected assignment is computed by a plain loop over experts and rows, not
by ``routing``'s ranking code.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import capmoe_compile
from capmoe_compile import config, routing


@pytest.fixture
def least():
    def pair_key(probs, ids, seed):
        return -probs.gather(1, ids).float()

    def dense_key(probs, seed):
        return -probs.float()

    policy = routing.register_policy(
        routing.Policy("least", "keep the smallest probabilities", pair_key, dense_key)
    )
    yield policy
    routing._REGISTRY.pop("least")


def _expected(P, ids, W, C):
    """Per expert: keep the C selected pairs of smallest P (ties: the earlier row)."""
    T, k = ids.shape
    E = P.shape[1]
    out_ids, out_w = ids.clone(), W.clone()
    for e in range(E):
        pairs = [(float(P[t, e]), t, j) for t in range(T) for j in range(k) if ids[t, j] == e]
        pairs.sort(key=lambda p: (p[0], p[1]))
        for _, t, j in pairs[C:]:
            out_ids[t, j], out_w[t, j] = E, 0.0
    return out_ids, out_w


@pytest.mark.parametrize("T,E,k", [(7, 4, 2), (64, 8, 2), (300, 16, 4), (1100, 8, 2)])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_a_registered_policy_routes_as_its_key_says(least, T, E, k, gamma):
    g = torch.Generator().manual_seed(T + E)
    P = torch.softmax(torch.randn(T, E, generator=g) * 2, -1)
    W, ids = P.topk(k, -1)
    got_ids, got_w = capmoe_compile.route(P, ids, W, capacity_factor=gamma, policy="least")
    C = routing.capacity(T, E, k, gamma)
    want_ids, want_w = _expected(P, ids, W, C)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)
    assert routing.output_width(k, E, "least", None) == k


def test_config_accepts_registered_policies_only(least):
    with config.patch(policy="least"):
        assert config.resolve()["policy"] == "least"
    with pytest.raises(ValueError, match="least"):  # the message lists what is allowed
        config.validate("policy", "nosuchpolicy")


def test_a_policy_is_a_pair_policy_or_a_candidate_policy():
    with pytest.raises(ValueError, match="pair_key and dense_key"):
        routing.Policy("half", "only a pair key", pair_key=lambda p, i, s: p)
    with pytest.raises(ValueError, match="already registered"):
        routing.register_policy(routing.Policy("score", "again", candidates=lambda *a: a))


def test_the_built_in_policies_are_registered():
    assert routing.policy_names()[:6] == routing.POLICIES
    assert set(routing.POLICIES) == {
        "score",
        "order",
        "reverse",
        "random",
        "expanded_drop",
        "reroute",
    }
    widths = {n: routing.output_width(2, 8, n, None) for n in routing.POLICIES}
    assert widths == {n: (8 if n == "expanded_drop" else 2) for n in routing.POLICIES}
    assert (
        math.isfinite(len(routing.PAIR_POLICIES)) and "expanded_drop" not in routing.PAIR_POLICIES
    )


def test_routing_has_no_if_chain_over_policy_names():
    """Policies differ by their registered functions, never by comparing names."""
    src = Path(routing.__file__).read_text()
    names = set(routing.POLICIES)
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Compare):
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant)]
            hit = [c.value for c in consts if c.value in names]
            assert not hit, f"routing.py line {node.lineno} compares against {hit}"
