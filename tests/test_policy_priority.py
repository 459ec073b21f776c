"""``priority`` (Batch Prioritized Routing, SPEC.md "Policies"), checked against a plain loop
over experts and rows that knows nothing of ``routing``'s ranking code: each expert past its
capacity keeps the ``C`` tokens of largest ``max_e' P[t, e']`` (ties: the earlier row)."""

from __future__ import annotations

import pytest
import torch

import capmoe_compile
from capmoe_compile import config, routing


def _expected(P, ids, W, C):
    T, k = ids.shape
    E = P.shape[1]
    prio = [max(float(P[t, e]) for e in range(E)) for t in range(T)]
    out_ids, out_w = ids.clone(), W.clone()
    for e in range(E):
        rows = sorted({t for t in range(T) for j in range(k) if ids[t, j] == e})
        rows.sort(key=lambda t: (-prio[t], t))
        for t in rows[C:]:
            for j in range(k):
                if ids[t, j] == e:
                    out_ids[t, j], out_w[t, j] = E, 0.0
    return out_ids, out_w


# (7, 4, 2) and (64, 8, 2) rank densely, (300, 16, 4) and (1100, 8, 2) by pairs (DENSE_CELLS)
@pytest.mark.parametrize("T,E,k", [(7, 4, 2), (64, 8, 2), (300, 16, 4), (1100, 8, 2)])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_priority_keeps_the_most_confident_tokens(T, E, k, gamma):
    g = torch.Generator().manual_seed(T * 3 + E)
    P = torch.softmax(torch.randn(T, E, generator=g) * 2, -1)
    W, ids = P.topk(k, -1)
    got_ids, got_w = capmoe_compile.route(P, ids, W, capacity_factor=gamma, policy="priority")
    want_ids, want_w = _expected(P, ids, W, routing.capacity(T, E, k, gamma))
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)


def test_priority_ties_go_to_the_earlier_row():
    # every row equally confident: the first C rows of each expert are kept
    P = torch.full((6, 3), 1 / 3)
    ids = torch.tensor([[0], [0], [0], [1], [1], [2]])
    W = P.gather(1, ids)
    got, _ = capmoe_compile.route(P, ids, W, capacity_factor=1.0, policy="priority")  # C = 2
    assert got.view(-1).tolist() == [0, 0, 3, 1, 1, 2]


def test_priority_differs_from_score():
    # row 0 is sure of expert 0 (its max P is high), row 1 less so but likes expert 1 more
    # than row 0 does: with C = 1, score keeps row 1 on expert 1, priority keeps row 0
    P = torch.tensor([[0.90, 0.08, 0.02], [0.45, 0.40, 0.15]])
    ids = torch.tensor([[0, 1], [0, 1]])
    W = P.gather(1, ids)
    kw = {"capacity_factor": 0.75}  # C = ceil(0.75 * 2 * 2 / 3) = 1
    by_score, _ = capmoe_compile.route(P, ids, W, policy="score", **kw)
    by_priority, _ = capmoe_compile.route(P, ids, W, policy="priority", **kw)
    assert by_score.tolist() == [[0, 3], [3, 1]]
    assert by_priority.tolist() == [[0, 1], [3, 3]]


def test_priority_is_registered_and_configurable():
    assert "priority" in routing.policy_names()
    assert "priority" not in routing.POLICIES  # the sweeps' and calibration's set is unchanged
    assert routing.output_width(2, 8, "priority", None) == 2
    with config.patch(policy="priority"):
        assert config.resolve()["policy"] == "priority"
