"""``routing._keep_selected`` (capacity ranked on the T*k selected pairs) against the dense
``[G, R, E]`` ranking it replaced for score/order/reverse/random/reroute (``_rank_rows`` over
every cell), on inputs the oracle tests of ``test_route.py`` do not reach: an expert twice in
one row, ``-inf``, ``NaN``, ``+inf``, ``-0.0`` and heavily tied keys, padding rows, several groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from capmoe_compile import routing
from capmoe_compile.policies import ranking, reroute


def dense_kept_slot(key_te, ids, rows_valid, cap_g, G, E):
    """The dense formulation: rank every (row, expert) cell, keep members below capacity."""
    T = ids.shape[0]
    sel = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True) & rows_valid[:, None]
    view = (G, T // G, E)
    keep = sel & (routing._rank_rows(key_te.reshape(view), sel.view(view)) < cap_g).reshape(T, E)
    return keep.gather(1, ids)


def _case(seed, T, E, k, G, kind):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if kind in ("dups", "all"):  # some rows select one expert twice or more
        rows = torch.rand(T, generator=g) < 0.3
        ids[rows, -1] = ids[rows, 0]
    if kind == "int":
        key = torch.randint(0, 3, (T, E), generator=g)  # few distinct values: many ties
    else:
        key = torch.randint(0, 4, (T, E), generator=g).float() / 4  # ties
        if kind in ("special", "all"):
            r = torch.rand(T, E, generator=g)
            key[r < 0.15] = float("-inf")
            key[(r >= 0.15) & (r < 0.2)] = float("nan")
            key[(r >= 0.2) & (r < 0.25)] = float("inf")
            key[(r >= 0.25) & (r < 0.35)] = -0.0  # equal to the 0.0 keys for torch.sort
            key[(r >= 0.35) & (r < 0.4)] = -torch.tensor(float("nan"))  # sign bit set
    valid = torch.rand(T, generator=g) > (0.25 if kind in ("special", "all", "int") else 0.0)
    cap_g = torch.randint(1, max(2, 2 * T * k // (G * E)), (G, 1, 1), generator=g)
    return key, ids, valid, cap_g


@pytest.mark.parametrize("kind", ["plain", "dups", "int", "special", "all"])
@pytest.mark.parametrize(
    ("T", "E", "k", "G"), [(1, 4, 2, 1), (12, 4, 2, 3), (40, 8, 3, 4), (64, 16, 4, 1)]
)
@pytest.mark.parametrize("path", ["auto", "general"])
def test_pairs_match_dense(T, E, k, G, kind, path, monkeypatch):
    """``auto``: the positional rank where no duplicate or ``-inf`` occurs (``plain`` and
    ``int``), the general one elsewhere; ``general``: the branch-free path every traced graph
    runs, on every input."""
    if path == "general":
        monkeypatch.setattr(ranking, "_concrete_cpu", lambda t: False)
    for seed in range(6):
        key_te, ids, valid, cap_g = _case(seed, T, E, k, G, kind)
        want = dense_kept_slot(key_te, ids, valid, cap_g, G, E)
        v = None if kind == "plain" and bool(valid.all()) else valid  # None: every row counts
        got = routing._keep_selected(key_te.gather(1, ids), ids, v, cap_g, G, E)
        assert torch.equal(got, want), (seed, ids, got, want)


@pytest.mark.parametrize("kind", ["plain", "all"])
def test_pairs_match_dense_padded_sort(kind):
    """T*k in [20480, 32768): the sort is padded to ATen's radix-sort size (the padding codes
    sort last and are cut off)."""
    T, E, k, G = 3072, 64, 8, 2
    assert routing._RADIX_PAD_FROM <= T * k < routing._RADIX_MIN
    key_te, ids, valid, _ = _case(7, T, E, k, G, kind)
    cap_g = torch.tensor([150, 190]).view(G, 1, 1)  # about the mean load: keeps and drops
    want = dense_kept_slot(key_te, ids, valid, cap_g, G, E)
    v = None if kind == "plain" and bool(valid.all()) else valid
    got = routing._keep_selected(key_te.gather(1, ids), ids, v, cap_g, G, E)
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < T * k  # capacity both keeps and drops


def test_pairs_can_fail():
    """The comparison sees a wrong rank: a capacity one lower changes the decision."""
    key_te, ids, valid, cap_g = _case(0, 40, 8, 3, 4, "all")
    want = dense_kept_slot(key_te, ids, valid, cap_g, 4, 8)
    got = routing._keep_selected(key_te.gather(1, ids), ids, valid, (cap_g - 1).clamp_min(0), 4, 8)
    assert not torch.equal(got, want)


@pytest.mark.parametrize("form", ["pairs", "dense"])
@pytest.mark.parametrize("policy", ["score", "reroute", "order", "random"])
@pytest.mark.parametrize("tracer", ["make_fx", "aot"])
def test_pairs_trace_with_static_shapes(policy, tracer, form, monkeypatch):
    """``route_reference`` traced under fake tensors with static shapes (as AOTAutograd traces
    the static EP layer of ``distributed/functional.py``) reads no value off a tensor, and the
    traced graph equals eager, ``-inf`` keys (the rank correction) and padding included. Reading
    one (``bool()`` of the ``-inf`` check) failed the trace, and the static EP layer then never
    reached Inductor (``test_static_functional_path_inductor_sees_collectives``)."""
    from functorch.compile import aot_function, make_boxed_func
    from torch.fx.experimental.proxy_tensor import make_fx

    T, E, k, G = 24, 8, 2, 2
    monkeypatch.setattr(routing, "DENSE_CELLS", -1 if form == "pairs" else T * E)
    key_te, ids, valid, _ = _case(3, T, E, k, G, "special")
    probs = torch.where(key_te.isnan(), 0.5, key_te)  # -inf, +inf, -0.0 and ties stay
    assert bool((probs.gather(1, ids) == float("-inf")).any())
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(1))

    def fn(probs, ids, w, valid):
        return routing.route_reference(
            probs,
            ids,
            w,
            capacity_factor=0.5,
            policy=policy,
            capacity_scope="sequence",
            num_sequences=G,
            valid=valid,
        )

    graphs = []
    if tracer == "make_fx":
        gm = make_fx(fn, tracing_mode="fake")(probs, ids, w, valid)
        graphs.append(gm)
    else:

        def keep(gm, _inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        gm = aot_function(fn, fw_compiler=keep)
    got = gm(probs, ids, w, valid)
    assert graphs and "_local_scalar_dense" not in str(graphs[0].graph)
    for a, b in zip(got, fn(probs, ids, w, valid), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _reroute_with(dense: bool, probs, ids, w, valid, G, rounds, gamma, monkeypatch):
    # the pair ranking and rounds whatever the size (route_reference's size dispatch would
    # take the dense form at these sizes); ``dense``: the dense rounds behind the pair ranking
    monkeypatch.setattr(routing, "DENSE_CELLS", -1)
    if dense:

        def d(P, ids, kept_slot, rows_valid, out_ids, out_w, cap_g, G_, scale, r):
            T, E = P.shape
            sel = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True) & rows_valid[:, None]
            keep = torch.zeros_like(sel).scatter_(1, ids, kept_slot) & sel
            view = (G_, T // G_, E)
            return routing._reroute_dense(P, sel, keep, out_ids, out_w, cap_g, view, scale, r)

        monkeypatch.setattr(reroute, "_reroute", d)
    try:
        return routing.route_reference(
            probs,
            ids,
            w,
            capacity_factor=gamma,
            policy="reroute",
            reroute_rounds=rounds,
            capacity_scope="sequence" if G > 1 else "batch",
            num_sequences=G,
            valid=valid,
        )
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("kind", ["plain", "ties", "special", "padding"])
@pytest.mark.parametrize(
    ("T", "E", "k", "G"),
    [(12, 4, 2, 3), (40, 8, 3, 4), (64, 16, 4, 1), (33, 8, 6, 1), (64, 64, 8, 2)],
)
def test_reroute_pairs_match_dense(T, E, k, G, kind, monkeypatch):
    """``_reroute`` (proposals by one topk of unique codes, acceptance ranked on the proposal
    pairs) equals the dense rounds it replaced, bit for bit, over 1-3 rounds and two gammas:
    tied scores, ``-inf``/``-0.0`` scores, an expert selected twice, padding rows, groups."""
    changed = 0
    for seed, rounds, gamma in itertools.product(range(3), (1, 2, 3), (0.5, 1.0)):
        g = torch.Generator().manual_seed(seed)
        probs = torch.rand(T, E, generator=g).softmax(-1)
        if kind == "ties":
            probs = (probs * 8).round() / 8
        if kind == "special":
            r = torch.rand(T, E, generator=g)
            probs = probs.masked_fill(r < 0.1, float("-inf")).masked_fill(
                (r > 0.1) & (r < 0.2), 0.0
            )
            probs = probs.masked_fill((r > 0.2) & (r < 0.25), -0.0)
        w, ids = probs.topk(k, -1)
        if kind == "special":
            rows = torch.rand(T, generator=g) < 0.2  # an expert selected twice
            ids[rows, -1] = ids[rows, 0]
        valid = torch.rand(T, generator=g) > 0.3 if kind in ("padding", "special") else None
        a = _reroute_with(False, probs, ids, w, valid, G, rounds, gamma, monkeypatch)
        b = _reroute_with(True, probs, ids, w, valid, G, rounds, gamma, monkeypatch)
        assert torch.equal(a[0], b[0]), (seed, rounds, gamma)
        assert torch.equal(a[1].nan_to_num(-7.0), b[1].nan_to_num(-7.0)), (seed, rounds, gamma)
        score = routing.route_reference(
            probs,
            ids,
            w,
            capacity_factor=gamma,
            capacity_scope="sequence" if G > 1 else "batch",
            num_sequences=G,
            valid=valid,
        )
        changed += not torch.equal(a[0], score[0])
    assert changed  # the rounds re-routed something


@pytest.mark.parametrize("policy", routing.PAIR_POLICIES)
@pytest.mark.parametrize(
    ("T", "E", "k", "G", "dense"),
    # routing.DENSE_CELLS = 8192 T*E cells: the dense form at and below, the pairs above
    [(16, 8, 2, 1, True), (1024, 8, 2, 4, True), (1032, 8, 2, 4, False), (130, 64, 8, 1, False)],
)
def test_route_size_dispatch(T, E, k, G, dense, policy, monkeypatch):
    """``route_reference``'s size dispatch (dense ranking and reroute rounds up to
    ``DENSE_CELLS`` cells, the pair forms above) on both sides of the switch: it takes the
    expected form, and its result equals both forms forced, bit for bit (tied scores,
    ``-inf``, an expert twice in a row, padding rows, groups)."""
    assert (T * E <= routing.DENSE_CELLS) == dense
    g = torch.Generator().manual_seed(T + E)
    probs = ((torch.rand(T, E, generator=g) * 8).round() / 8).softmax(-1)  # tied scores
    probs[torch.rand(T, E, generator=g) < 0.05] = float("-inf")
    w, ids = probs.topk(k, -1)
    ids[torch.rand(T, generator=g) < 0.1, -1] = ids[0, 0]  # some rows select an expert twice
    kw = dict(capacity_factor=0.75, policy=policy, reroute_rounds=2, seed=5)
    kw.update(capacity_scope="sequence" if G > 1 else "batch", num_sequences=G)
    pair_calls, cells_default = [], routing.DENSE_CELLS
    spy = routing._keep_selected

    def counted(*a, **k):
        pair_calls.append(1)
        return spy(*a, **k)

    monkeypatch.setattr(routing, "_keep_selected", counted)
    for valid in (None, torch.rand(T, generator=g) > 0.2):
        pair_calls.clear()
        got = routing.route_reference(probs, ids, w, valid=valid, **kw)
        assert bool(pair_calls) != dense
        assert bool((got[0] == E).any())  # capacity dropped something
        for cells in (-1, 1 << 62):  # the pair form, the dense form
            monkeypatch.setattr(routing, "DENSE_CELLS", cells)
            want = routing.route_reference(probs, ids, w, valid=valid, **kw)
            monkeypatch.setattr(routing, "DENSE_CELLS", cells_default)
            assert torch.equal(got[0], want[0]), cells
            assert torch.equal(got[1].nan_to_num(-7.0), want[1].nan_to_num(-7.0)), cells
