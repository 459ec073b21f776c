"""A slow, deliberately plain reference implementation of SPEC.md's routing semantics.

Everything here works on Python lists and loops over tokens and experts, so that each step
can be read against the text of SPEC.md ("Capacity", "Scope and padding", "Policies"). It
is used only by the tests; it is not meant to be fast.

Conventions (SPEC.md + the route() API):

* the sentinel id for a dropped slot is ``E`` and its weight is ``0``;
* for ``score``/``order``/``reverse``/``random``/``reroute`` the output has ``k`` columns and
  column ``j`` is the model's slot ``j``;
* for ``expanded_drop`` the output has ``k + min(len(L), E - k)`` columns: first the model's
  ``k`` slots (kept or sentinel), then the added pairs in ascending expert id, padded with
  sentinels;
* ``valid[t] == False`` marks padding rows: not counted in ``T``/``S_s`` nor in any load,
  and every slot of such a row is the sentinel;
* ``capacity_factor is None`` or (valid) ``T < min_tokens``: the input comes back unchanged.
"""

from __future__ import annotations

import random as _random
from fractions import Fraction

POLICIES = ("score", "order", "reverse", "random", "expanded_drop", "reroute")

# Two ratios W/P count as "the same" per-token scale when they agree to this relative
# tolerance. The tests only generate data that is either consistent to rounding error or
# inconsistent by a wide margin, so the exact value does not matter.
SCALE_RTOL = 1e-3


def _as_fraction(x) -> Fraction:
    """gamma read as its decimal value: 1.1 means 11/10 exactly."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, int):
        return Fraction(x)
    return Fraction(str(float(x)))


def _ceil_fraction(q: Fraction) -> int:
    return -((-q.numerator) // q.denominator)


def capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor,
    min_capacity: int = 1,
    capacity_align: int = 1,
) -> int:
    """C = max(1, ceil(gamma * T * k / E)); then at least min_capacity; then rounded up to a
    multiple of capacity_align."""
    gamma = _as_fraction(capacity_factor)
    c = _ceil_fraction(gamma * num_tokens * top_k / num_experts)
    c = max(1, c)
    c = max(c, min_capacity)
    align = max(1, capacity_align)
    c = -((-c) // align) * align
    return c


def expanded_width(num_experts: int, top_k: int, local_experts=None) -> int:
    local = list(local_experts) if local_experts else list(range(num_experts))
    return top_k + min(len(local), num_experts - top_k)


def per_token_scale(p_row: list[float], id_row: list[int], w_row: list[float]) -> float:
    """W[t, e] / P[t, e] over the token's selected pairs if that is the same for all of them,
    else 1."""
    ratios = []
    for j, e in enumerate(id_row):
        p = p_row[e]
        if p == 0.0:
            return 1.0
        ratios.append(w_row[j] / p)
    if not ratios:
        return 1.0
    lo = min(ratios)
    hi = max(ratios)
    if hi - lo <= SCALE_RTOL * max(abs(lo), abs(hi)):
        return ratios[0]
    return 1.0


def _to_lists(probs, topk_ids, topk_weights, valid):
    """Accept torch tensors or nested lists."""

    def conv(x, kind):
        if x is None:
            return None
        if hasattr(x, "tolist"):
            if kind is float:
                x = x.double()
            return x.tolist()
        return [list(r) for r in x] if kind is not bool else list(x)

    P = conv(probs, float)
    ids = conv(topk_ids, int)
    W = conv(topk_weights, float)
    v = conv(valid, bool) if valid is not None else None
    return P, ids, W, v


def route_oracle(
    probs,
    topk_ids,
    topk_weights,
    *,
    capacity_factor,
    policy: str = "score",
    local_experts=None,
    renormalize: bool = False,
    reroute_rounds: int = 1,
    seed: int = 0,
    min_tokens: int = 0,
    min_capacity: int = 1,
    capacity_align: int = 1,
    capacity_scope: str = "batch",
    num_sequences: int = 1,
    valid=None,
    num_experts: int | None = None,
):
    """Returns (ids, weights, info): ids/weights as lists of lists (floats for weights), and
    info = dict(capacities=[C per group], groups=[[rows]], fallback=bool).

    For ``random`` the chosen subsets come from Python's ``random`` module; they will not
    match the implementation's generator, only its structure (tests compare structure).
    """
    if policy not in POLICIES:
        raise ValueError(policy)
    P, ids, W, valid_l = _to_lists(probs, topk_ids, topk_weights, valid)
    T = len(ids)
    E = num_experts if num_experts is not None else (len(P[0]) if T else None)
    if E is None:
        raise ValueError("pass num_experts when T == 0")
    k = len(ids[0]) if T else None
    if k is None:
        if hasattr(topk_ids, "shape"):
            k = int(topk_ids.shape[1])
        else:
            raise ValueError("cannot infer k")
    if valid_l is None:
        valid_l = [True] * T

    # ---- fallbacks: the layer runs as the model wrote it -------------------------------
    n_valid = sum(1 for t in range(T) if valid_l[t])
    if capacity_factor is None or n_valid < min_tokens:
        return (
            [list(r) for r in ids],
            [list(r) for r in W],
            {"capacities": [], "groups": [], "fallback": True},
        )

    local = list(local_experts) if local_experts else list(range(E))
    local_set = set(local)
    sentinel = E

    # ---- groups (capacity scope) --------------------------------------------------------
    if capacity_scope == "batch":
        groups = [[t for t in range(T) if valid_l[t]]]
    elif capacity_scope == "sequence":
        if num_sequences <= 0 or T % num_sequences != 0:
            raise ValueError("T must be a multiple of num_sequences")
        s_len = T // num_sequences
        groups = []
        for s in range(num_sequences):
            rows = [t for t in range(s * s_len, (s + 1) * s_len) if valid_l[t]]
            groups.append(rows)
    else:
        raise ValueError(capacity_scope)

    # per-slot decision for the model's k slots: keep[t][j]
    keep = [[False] * k for _ in range(T)]
    # for reroute: replacement expert per slot (None = none); for expanded: added experts
    new_expert = [[None] * k for _ in range(T)]
    added = [[] for _ in range(T)]  # expanded_drop only
    capacities = []

    rng = _random.Random(seed)

    for rows in groups:
        n = len(rows)
        C = capacity(n, E, k, capacity_factor, min_capacity, capacity_align)
        capacities.append(C)

        if policy == "expanded_drop":
            for e in range(E):
                cands = []  # (t, slot or None)
                for t in rows:
                    slot = None
                    for j in range(k):
                        if ids[t][j] == e:
                            slot = j
                    if slot is not None or e in local_set:
                        cands.append((t, slot))
                cands.sort(key=lambda c, e=e: (-P[c[0]][e], c[0]))
                for t, slot in cands[:C]:
                    if slot is not None:
                        keep[t][slot] = True
                    else:
                        added[t].append(e)
            continue

        # S_e for every expert: list of (t, j)
        for e in range(E):
            S_e = []
            for t in rows:
                for j in range(k):
                    if ids[t][j] == e:
                        S_e.append((t, j))
            if len(S_e) <= C:
                chosen = S_e
            elif policy in ("score", "reroute"):
                chosen = sorted(S_e, key=lambda tj, e=e: (-P[tj[0]][e], tj[0]))[:C]
            elif policy == "order":
                chosen = sorted(S_e, key=lambda tj: tj[0])[:C]
            elif policy == "reverse":
                chosen = sorted(S_e, key=lambda tj: -tj[0])[:C]
            elif policy == "random":
                chosen = rng.sample(S_e, C)
            else:  # pragma: no cover
                raise AssertionError(policy)
            for t, j in chosen:
                keep[t][j] = True

        if policy == "reroute":
            assigned = {t: {ids[t][j] for j in range(k) if keep[t][j]} for t in rows}
            proposed = {t: set() for t in rows}
            load = [0] * E
            for t in rows:
                for e in assigned[t]:
                    load[e] += 1
            for _ in range(reroute_rounds):
                spare = [C - load[e] for e in range(E)]
                proposals = {e: [] for e in range(E)}
                for t in rows:
                    dropped_slots = [
                        j for j in range(k) if not keep[t][j] and new_expert[t][j] is None
                    ]
                    m = len(dropped_slots)
                    if m == 0:
                        continue
                    avail = [
                        e
                        for e in range(E)
                        if e not in assigned[t] and e not in proposed[t] and spare[e] > 0
                    ]
                    avail.sort(key=lambda e, t=t: (-P[t][e], e))
                    for e in avail[:m]:
                        proposals[e].append(t)
                        proposed[t].add(e)
                accepted = {t: [] for t in rows}
                for e in range(E):
                    props = sorted(proposals[e], key=lambda t, e=e: (-P[t][e], t))
                    for t in props[: max(0, spare[e])]:
                        accepted[t].append(e)
                for t in rows:
                    if not accepted[t]:
                        continue
                    # best accepted first into the lowest dropped slot
                    acc = sorted(accepted[t], key=lambda e, t=t: (-P[t][e], e))
                    dropped_slots = [
                        j for j in range(k) if not keep[t][j] and new_expert[t][j] is None
                    ]
                    for j, e in zip(dropped_slots, acc, strict=False):
                        new_expert[t][j] = e
                        assigned[t].add(e)
                        load[e] += 1

    # ---- assemble -----------------------------------------------------------------------
    width = expanded_width(E, k, local_experts) if policy == "expanded_drop" else k
    out_ids = [[sentinel] * width for _ in range(T)]
    out_w = [[0.0] * width for _ in range(T)]
    valid_rows = [t for rows in groups for t in rows]
    for t in valid_rows:
        scale = None
        for j in range(k):
            if keep[t][j]:
                out_ids[t][j] = ids[t][j]
                out_w[t][j] = W[t][j]
            elif new_expert[t][j] is not None:
                if scale is None:
                    scale = per_token_scale(P[t], ids[t], W[t])
                e = new_expert[t][j]
                out_ids[t][j] = e
                out_w[t][j] = P[t][e] * scale
        if policy == "expanded_drop":
            extra = sorted(added[t])
            if extra:
                scale = per_token_scale(P[t], ids[t], W[t])
            for i, e in enumerate(extra):
                out_ids[t][k + i] = e
                out_w[t][k + i] = P[t][e] * scale
        if renormalize:
            orig = sum(W[t])
            now = sum(out_w[t])
            if now != 0.0:
                out_w[t] = [w * orig / now for w in out_w[t]]

    return out_ids, out_w, {"capacities": capacities, "groups": groups, "fallback": False}
