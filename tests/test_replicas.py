"""SPEC.md's "Redundant expert copies": capmoe_compile.replicas against capmoe_compile.route
(R = 0, bit for bit) and against a plain loop oracle written from the SPEC text (R > 0)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

import capmoe_compile
from capmoe_compile import routing
from capmoe_compile.replicas import Placement, assign_copies, route_replicas

POLICIES = ("score", "order", "reverse", "random", "expanded_drop", "reroute")


def _data(T, E, k, seed, skew=2.0, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (
        torch.randn(T, E, generator=g)
        + torch.linspace(skew, -skew, E)[torch.randperm(E, generator=g)]
    )
    P = logits.softmax(-1)
    if ties:  # coarse probabilities: many exact ties among rows and among experts
        P = (P * 8).round() / 8 + 1e-3
    P = P.to(dtype)
    top, ids = P.float().topk(k, -1)
    W = (top / top.sum(-1, keepdim=True)).to(dtype)
    return P, ids, W


def _random_placement(E, R, ranks, seed, shares=False) -> Placement:
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, E, (R,), generator=g).tolist()
    experts = list(range(E)) + extra
    perm = torch.randperm(len(experts), generator=g).tolist()
    experts = [experts[i] for i in perm]
    rank_of = sorted(torch.randint(0, ranks, (len(experts),), generator=g).tolist())
    sh = None
    if shares:
        raw = (torch.rand(len(experts), generator=g) + 0.1).tolist()
        tot = [0.0] * E
        for e, s in zip(experts, raw, strict=True):
            tot[e] += s
        sh = tuple(s / tot[e] for e, s in zip(experts, raw, strict=True))
    return Placement(E, tuple(experts), tuple(rank_of), sh)


# --------------------------------------------------------------------------------------------
# R = 0: route() bit for bit
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 4, 1), (5, 4, 2), (16, 8, 2), (64, 8, 2), (96, 32, 4), (300, 32, 4), (2100, 8, 2)]


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_identity_equals_route(T, E, k, policy):
    for trial, (gamma, scope, pad, renorm) in enumerate(
        itertools.product((0.5, 1.0, 1.3), ("batch", "sequence"), (False, True), (False, True))
    ):
        P, ids, W = _data(T, E, k, seed=T * 131 + trial, ties=trial % 3 == 0)
        nseq = 1
        if scope == "sequence":
            nseq = next(d for d in (4, 3, 2, 1) if T % d == 0)
        valid = None
        if pad:
            valid = torch.rand(T, generator=torch.Generator().manual_seed(trial)) > 0.2
        kw = dict(
            capacity_factor=gamma, policy=policy, renormalize=renorm, seed=trial,
            capacity_scope=scope, num_sequences=nseq, valid=valid,
            min_tokens=3 if trial % 5 == 0 else 0, reroute_rounds=1 + trial % 2,
        )  # fmt: skip
        if policy == "expanded_drop" and trial % 2:
            kw["local_experts"] = list(range(0, E, 2))
        want_ids, want_w = capmoe_compile.route(P, ids, W, **kw)
        local = kw.pop("local_experts", None)
        got = route_replicas(P, ids, W, Placement.identity(E, 2), local_copies=local, **kw)
        assert torch.equal(got.ids, want_ids), (policy, trial)
        assert torch.equal(got.weights, want_w), (policy, trial)
        # with R = 0 a copy id is its expert id
        assert torch.equal(got.copy_ids, want_ids)


def test_identity_off_and_half():
    P, ids, W = _data(40, 8, 2, 0, dtype=torch.float16)
    for pol in POLICIES:
        a = capmoe_compile.route(P, ids, W, capacity_factor=0.75, policy=pol)
        b = route_replicas(P, ids, W, capacity_factor=0.75, policy=pol)
        assert torch.equal(a[0], b.ids) and torch.equal(a[1], b.weights)
    b = route_replicas(P, ids, W, capacity_factor=None)
    assert torch.equal(b.ids, ids) and torch.equal(b.weights, W)


# --------------------------------------------------------------------------------------------
# the loop oracle, from SPEC's text
# --------------------------------------------------------------------------------------------


def _cap(n, Ep, k, gamma):
    return max(1, math.ceil(Fraction(repr(float(gamma))) * n * k / Ep))


def oracle(P, ids, W, pl: Placement, *, gamma, policy, split="round_robin", token_rank=None,
           local_copies=None, rounds=1, seed=0, nseq=1, valid=None, renormalize=False):  # fmt: skip
    P = P.double().tolist()
    idl = ids.tolist()
    Wl = W.double().tolist()
    T, k = len(idl), len(idl[0])
    E, Ep = pl.num_experts, pl.num_copies
    valid = [True] * T if valid is None else valid.tolist()
    copies = {e: pl.copies(e) for e in range(E)}
    out_ids = [[E] * k for _ in range(T)]
    out_c = [[Ep] * k for _ in range(T)]
    out_w = [[0.0] * k for _ in range(T)]
    extra = [[] for _ in range(T)]  # expanded: (e, copy)
    L = T // nseq
    scale = []
    for t in range(T):
        r = [Wl[t][j] / P[t][idl[t][j]] if P[t][idl[t][j]] > 0 else None for j in range(k)]
        ok = None not in r and max(r) - min(r) <= 1e-5 * max(r)
        scale.append(sum(r) / k if ok else 1.0)
    for g in range(nseq):
        rows = [t for t in range(g * L, (g + 1) * L) if valid[t]]
        C = _cap(len(rows), Ep, k, gamma)
        # copy of each pair, in pair order
        seen = {e: 0 for e in range(E)}
        n_e = {e: 0 for e in range(E)}
        for t in rows:
            for e in dict.fromkeys(idl[t]):
                n_e[e] += 1
        cid = {}
        for t in rows:
            for e in idl[t]:
                if (t, e) in cid:
                    continue
                jj = seen[e]
                seen[e] += 1
                cs = copies[e]
                if split == "round_robin":
                    cid[t, e] = cs[jj % len(cs)]
                else:
                    cum, pick = 0.0, cs[-1]
                    for p in cs:
                        cum += pl.shares[p]
                        if jj < math.floor(n_e[e] * cum + 0.5):
                            pick = p
                            break
                    cid[t, e] = pick
        members = {p: [] for p in range(Ep)}
        for (t, e), p in cid.items():
            members[p].append((t, e))
        kept = set()
        if policy == "expanded_drop":
            cands = {p: list(m) for p, m in members.items()}
            for t in rows:
                loc = [p for p in range(Ep) if (
                    pl.rank_of[p] == int(token_rank[t]) if token_rank is not None
                    else local_copies is None or p in local_copies)]  # fmt: skip
                for e in range(E):
                    if e in idl[t]:
                        continue
                    mine = [p for p in loc if pl.expert_of[p] == e]
                    if mine:
                        cands[min(mine)].append((t, e))
            for p, m in cands.items():
                for t, e in sorted(m, key=lambda c: (-P[c[0]][c[1]], c[0]))[:C]:
                    if e in idl[t]:
                        kept.add((t, e))
                    else:
                        extra[t].append((e, p))
        else:
            for m in members.values():
                if policy in ("score", "reroute"):
                    key = lambda c: (-P[c[0]][c[1]], c[0])  # noqa: E731
                elif policy == "order":
                    key = lambda c: c[0]  # noqa: E731
                elif policy == "reverse":
                    key = lambda c: -c[0]  # noqa: E731
                else:
                    key = lambda c: (  # noqa: E731
                        -int(routing._hash_keys(seed, torch.tensor(c[0]), torch.tensor(c[1]))),
                        c[0],
                    )
                kept |= set(sorted(m, key=key)[:C])
        for t in rows:
            for j, e in enumerate(idl[t]):
                if (t, e) in kept:
                    out_ids[t][j], out_c[t][j], out_w[t][j] = e, cid[t, e], Wl[t][j]
        if policy == "reroute":
            load = {p: sum(1 for te in kept if cid[te] == p) for p in range(Ep)}
            spare = {p: max(0, C - load[p]) for p in range(Ep)}
            assigned = {t: {e for e in set(idl[t]) if (t, e) in kept} for t in rows}
            want = {t: len(set(idl[t])) - len(assigned[t]) for t in rows}
            proposed = {t: set() for t in rows}
            for _ in range(rounds):
                props = {p: [] for p in range(Ep)}
                for t in rows:
                    offers = []
                    for e in range(E):
                        if e in assigned[t]:
                            continue
                        av = [p for p in copies[e] if spare[p] > 0 and p not in proposed[t]]
                        if av:
                            offers.append((e, min(av, key=lambda p: (-spare[p], p))))
                    offers.sort(key=lambda o, t=t: (-P[t][o[0]], o[0]))
                    for e, p in offers[: want[t]]:
                        props[p].append((t, e))
                        proposed[t].add(p)
                acc = {t: [] for t in rows}
                for p, m in props.items():
                    for t, e in sorted(m, key=lambda c: (-P[c[0]][c[1]], c[0]))[: spare[p]]:
                        acc[t].append((e, p))
                    spare[p] -= min(spare[p], len(m))
                for t in rows:
                    acc[t].sort(key=lambda o, t=t: (-P[t][o[0]], o[0]))
                    want[t] -= len(acc[t])
                    for e, p in acc[t]:
                        assigned[t].add(e)
                        j = out_ids[t].index(E)
                        out_ids[t][j], out_c[t][j] = e, p
                        out_w[t][j] = P[t][e] * scale[t]
    if policy == "expanded_drop":
        m = max(len({pl.expert_of[p] for p in range(Ep) if pl.rank_of[p] == r})
                for r in set(pl.rank_of)) if token_rank is not None else (
            E if local_copies is None else len({pl.expert_of[p] for p in local_copies}))  # fmt: skip
        width = k + min(m, E - k)
        for t in range(T):
            ex = sorted(extra[t])
            out_ids[t] += [e for e, _ in ex] + [E] * (width - k - len(ex))
            out_c[t] += [p for _, p in ex] + [Ep] * (width - k - len(ex))
            out_w[t] += [P[t][e] * scale[t] for e, _ in ex] + [0.0] * (width - k - len(ex))
    if renormalize:
        for t in range(T):
            a, b = sum(out_w[t]), sum(Wl[t])
            if a != 0:
                out_w[t] = [w * b / a for w in out_w[t]]
    return out_ids, out_c, out_w


CASES = [(24, 4, 2, 3, 2), (40, 8, 2, 8, 4), (64, 8, 2, 4, 8), (90, 16, 4, 6, 4), (200, 8, 2, 8, 8)]


@pytest.mark.parametrize("T,E,k,R,ranks", CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_copies_equal_oracle(T, E, k, R, ranks, policy):
    for trial in range(6):
        pl = _random_placement(E, R, ranks, seed=trial + T, shares=trial % 3 == 2)
        split = "share" if pl.shares is not None else "round_robin"
        P, ids, W = _data(T, E, k, seed=1000 + trial + T, skew=3.0, ties=trial % 2 == 1)
        gamma = (0.6, 1.0, 1.5)[trial % 3]
        nseq = 2 if trial % 4 == 3 else 1
        valid = (
            None
            if trial % 3
            else torch.rand(T, generator=torch.Generator().manual_seed(trial)) > 0.25
        )
        extra = {}
        if policy == "expanded_drop":
            if trial % 2:
                extra["token_rank"] = torch.arange(T) % pl.num_ranks
            elif trial % 3 == 2:
                extra["local_copies"] = list(range(0, pl.num_copies, 3))
        got = route_replicas(
            P, ids, W, pl, capacity_factor=gamma, policy=policy, split=split, seed=trial,
            capacity_scope="sequence" if nseq > 1 else "batch", num_sequences=nseq,
            valid=valid, renormalize=trial == 4, reroute_rounds=1 + trial % 2, **extra,
        )  # fmt: skip
        w_ids, w_c, w_w = oracle(
            P, ids, W, pl, gamma=gamma, policy=policy, split=split, seed=trial, nseq=nseq,
            valid=valid, renormalize=trial == 4, rounds=1 + trial % 2, **extra,
        )  # fmt: skip
        assert got.ids.tolist() == w_ids, (policy, trial)
        assert got.copy_ids.tolist() == w_c, (policy, trial)
        torch.testing.assert_close(got.weights.double(), torch.tensor(w_w, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_copy_properties(policy):
    E, k, T = 8, 2, 512
    for trial in range(4):
        pl = _random_placement(E, 6, 4, seed=trial)
        P, ids, W = _data(T, E, k, seed=trial, skew=4.0)
        gamma = 1.0
        # balance: before capacity, a logical expert's copies differ in load by at most 1
        cid = assign_copies(ids, pl)
        loads = torch.bincount(cid.flatten(), minlength=pl.num_copies)
        for e in range(E):
            cs = loads[pl.copies(e)]
            assert int(cs.max() - cs.min()) <= 1
        assert torch.equal(torch.tensor(pl.expert_of)[cid], ids)
        out = route_replicas(P, ids, W, pl, capacity_factor=gamma, policy=policy)
        C = routing.capacity(T, pl.num_copies, k, gamma)
        kept = out.copy_ids < pl.num_copies
        after = torch.bincount(out.copy_ids[kept], minlength=pl.num_copies)
        assert int(after.max()) <= C  # capacity per copy
        # every kept pair is at a copy of its logical expert; dropped pairs are sentinels both ways
        assert torch.equal(kept, out.ids < E)
        assert torch.equal(torch.tensor(pl.expert_of)[out.copy_ids[kept]], out.ids[kept])
        assert bool((out.weights[~kept] == 0).all())
        # no token gets one logical expert twice
        for row in out.ids.tolist():
            real = [e for e in row if e < E]
            assert len(real) == len(set(real))
        if policy != "expanded_drop":
            # copies keep more than capacity alone over the same slots would on skewed routing
            assert int(kept.sum()) >= int((capmoe_compile.route(
                P, ids, W, capacity_factor=gamma * E / pl.num_copies, policy=policy
            )[0] < E).sum()) * 0.8  # fmt: skip


def test_share_split_follows_shares():
    E, k, T = 4, 1, 400
    pl = Placement.from_copies(E, [[0, 1], [0, 2], [3]], shares=[[0.25, 1.0], [0.75, 1.0], [1.0]])
    ids = torch.zeros(T, k, dtype=torch.long)
    cid = assign_copies(ids, pl, split="share")
    loads = torch.bincount(cid.flatten(), minlength=pl.num_copies)
    assert loads.tolist() == [100, 0, 300, 0, 0]
    cid = assign_copies(ids, pl)  # round robin
    assert torch.bincount(cid.flatten(), minlength=5).tolist() == [200, 0, 200, 0, 0]


def test_reroute_moves_to_other_copy():
    # expert 0 has two copies; shares send 9 pairs to copy 0 and 3 to copy 1; C = 6:
    # reroute moves copy 0's 3 dropped pairs to copy 1 of the same expert
    E, T = 3, 12
    pl = Placement.from_copies(E, [[0], [0], [1], [2]], shares=[[0.75], [0.25], [1.0], [1.0]])
    P = torch.tensor([[0.8, 0.1, 0.1]] * T)
    ids = torch.zeros(T, 1, dtype=torch.long)
    W = torch.ones(T, 1)
    kw = dict(capacity_factor=2.0, split="share")
    score = route_replicas(P, ids, W, pl, policy="score", **kw)
    assert torch.bincount(score.copy_ids.flatten(), minlength=5).tolist() == [6, 3, 0, 0, 3]
    out = route_replicas(P, ids, W, pl, policy="reroute", **kw)
    assert out.ids.flatten().tolist() == [0] * T
    assert torch.bincount(out.copy_ids.flatten(), minlength=5).tolist() == [6, 6, 0, 0, 0]
    # the moved pairs are weighted P * scale (scale = W / P = 1.25)
    torch.testing.assert_close(out.weights, torch.ones(T, 1))


def test_placement_checks():
    with pytest.raises(ValueError, match="without a copy"):
        Placement(3, (0, 1), (0, 0))
    with pytest.raises(ValueError, match="sum to"):
        Placement(2, (0, 1, 1), (0, 1, 1), (1.0, 0.5, 0.2))
    pl = _random_placement(8, 4, 3, 0, shares=True)
    assert Placement.from_dict(pl.to_dict()) == pl
