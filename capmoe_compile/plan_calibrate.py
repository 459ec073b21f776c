"""Calibration for a plan: per-layer gamma and policy for a modeled EP speedup, searched by
the KL divergence from capacity off (one knapsack over all policies and one per policy) and
checked against every uniform gamma (:func:`calibrate_checked`; re-exported by
:mod:`capmoe_compile.plan`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .routing import capacity

#: The gammas :func:`calibrate_checked` tries, per layer and uniform.
UNIFORM_GAMMAS: tuple[float, ...] = (
    3.0, 2.5, 2.25, 2.0, 1.75, 1.5, 1.375, 1.25, 1.125, 1.0, 0.875, 0.75, 0.625, 0.5
)  # fmt: skip


@torch.no_grad()
def _candidate_pass(compiled, batches, ref_logp=None):
    """Loss, mean KL(capacity off || this setting) per scored token, and per-layer summed
    max loads (before, after) of one pass over ``batches`` (input-id tensors)."""
    from .telemetry import record_stats

    nll = kl = 0.0
    count = 0
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    calls: dict[str, list] = {}
    logps = []
    for i, ids in enumerate(batches):
        with record_stats() as st:
            logits = compiled(ids).logits
        logp = logits[:, :-1].double().log_softmax(-1)
        target = ids[:, 1:]
        nll -= float(logp.gather(-1, target[..., None]).sum())
        count += target.numel()
        if ref_logp is not None:
            ref = ref_logp[i]
            kl += float((ref.exp() * (ref - logp)).sum())
        else:
            logps.append(logp)
        for s in st.layers:
            before[s.name] = before.get(s.name, 0) + int(s.loads_before.max())
            after[s.name] = after.get(s.name, 0) + int(s.loads_after.max())
            calls.setdefault(s.name, []).append(
                (int(s.loads_before.max()), s.tokens, s.loads_before.numel(),
                 int(s.loads_before.sum()))
            )  # fmt: skip
    res = {"loss": nll / count, "kl": kl / count, "before": before, "after": after}
    res["calls"] = calls
    return res, logps


def _changes_nothing(calls, gamma: float) -> bool:
    """``C`` at least every recorded call's largest load: capacity leaves the layer as is."""
    for mx, tokens, E, pairs in calls:
        k = max(1, round(pairs / max(tokens, 1)))
        if capacity(tokens, E, k, gamma) < mx:
            return False
    return True


def _knapsack(options: dict[str, list[tuple[float, int, Any]]], budget: int, buckets: int = 2000):
    """One option ``(cost, load, choice)`` per layer, least summed cost with summed load <=
    ``budget`` (loads quantised to ``budget / buckets``, rounded up). None if none fits."""
    q = max(budget, 1) / buckets
    best: dict[int, tuple[float, list]] = {0: (0.0, [])}
    for name, opts in options.items():
        nxt: dict[int, tuple[float, list]] = {}
        for used, (c0, picks) in best.items():
            for cost, load, choice in opts:
                u = used + math.ceil(load / q - 1e-9)
                if u > buckets:
                    continue
                c = c0 + cost
                if u not in nxt or c < nxt[u][0]:
                    nxt[u] = (c, picks + [(name, choice)])
        best = nxt
    if not best:
        return None
    return min(best.values(), key=lambda v: v[0])[1]


def _layer_table(measure, off, policies, gammas, stop_kl) -> dict[str, list]:
    """Per layer: ``(KL, summed max load, (gamma, policy) or None)`` of capacity off and of
    every candidate that changes something, one pass each with only that layer capped."""
    table: dict[str, list] = {}
    for name in off["before"]:
        opts = [(0.0, off["before"][name], None)]
        for policy in policies:
            for g in sorted(gammas, reverse=True):
                if _changes_nothing(off["calls"][name], g):
                    continue  # C above every call's largest load: no pass needed
                res = measure({name: {"capacity_factor": g, "policy": policy}})
                opts.append((res["kl"], res["after"][name], (g, policy)))
                if res["kl"] > stop_kl:
                    break
        table[name] = opts
    return table


def _restrict(table: dict[str, list], policy: str | None) -> dict[str, list]:
    """``table`` with only capacity off and ``policy``'s options per layer (None: all)."""
    if policy is None:
        return table
    return {n: [o for o in opts if o[2] is None or o[2][1] == policy] for n, opts in table.items()}


def _per_layer_rows(
    table, total_before, target, measure, repair_rounds, kind: str = "per-layer"
) -> list[dict]:
    """The knapsack's combination measured on all layers at once; a combination short of
    ``target`` tightens the budget by the shortfall and is solved again."""
    rows = []
    budget = int(total_before / target)
    for _ in range(repair_rounds + 1):
        picks = _knapsack(table, budget)
        if picks is None:
            break
        layers = {
            n: {"capacity_factor": None, "policy": "score"}
            if ch is None
            else {"capacity_factor": ch[0], "policy": ch[1]}
            for n, ch in picks
        }
        row = {"kind": kind, "layers": layers, **measure(layers)}
        rows.append(row)
        if row["speedup"] >= target:
            break
        budget = int(budget * row["speedup"] / target)  # short: tighten by the shortfall
    return rows


def _measurer(model, compiled, batches, cache: dict):
    """``measure(layers)``: one pass of ``compiled`` over ``batches`` with the per-layer
    setting ``layers`` applied (KL and loss against capacity off, loads, modeled speedup),
    memoised in ``cache["measured"]``: one pass per distinct setting across targets."""
    from . import config
    from .calibrate import Calibration, model_speedup

    off, ref = cache["off"]

    def measure(layers: dict) -> dict:
        key = tuple(sorted((n, o["capacity_factor"], o["policy"]) for n, o in layers.items()))
        memo = cache.setdefault("measured", {})
        if key not in memo:
            c = Calibration(layers)
            c.apply(model)
            try:
                with config.patch(capacity_factor=None):
                    res, _ = _candidate_pass(compiled, batches, ref)
            finally:
                c.clear(model)
            res["speedup"] = model_speedup(off["before"], res["after"])
            res.pop("calls")
            memo[key] = res
        return dict(memo[key])

    return measure


def calibrate_checked(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    target: float,
    policies: Sequence[str] = ("score", "reroute"),
    gammas: Sequence[float] = UNIFORM_GAMMAS,
    compiled: Any = None,
    cache: dict | None = None,
    stop_kl: float = 0.05,
    repair_rounds: int = 3,
    check: str = "kl",
):
    """Per-layer capacity (gamma and policy) for a modeled EP speedup of ``target`` on
    ``batches``, checked against every uniform gamma; a ``capmoe_compile.Calibration``.

    What differs from ``capmoe_compile.calibrate`` (whose result can lose to one gamma for
    every layer by a few hundredths of a percent of perplexity):

    - *the proxy*: every setting is scored by the mean KL divergence of its next-token
      distribution from capacity off's on the calibration tokens (paired and label-free:
      how far capacity moves the model), not by a difference of two noisy cross-entropies;
    - *the search*: per layer and ``(policy, gamma)`` of ``policies`` x ``gammas`` that
      changes anything, one pass with only that layer capped (KL, the layer's summed max
      load); the descent of a policy stops past ``stop_kl``. Per-layer KLs are assumed to add
      up; a multiple-choice knapsack (``_knapsack``) picks the least summed KL whose summed
      max loads reach ``target`` (SPEC's model speedup, ``calibrate.model_speedup``);
    - *one candidate per policy*: besides the knapsack over every ``(policy, gamma)`` (kind
      ``"per-layer"``), with several ``policies`` the knapsack is solved again with each
      policy alone (``"per-layer <policy>"``): the KL ranks the gammas of one policy well but
      is biased across policies (``reroute`` moves the distribution further from capacity off
      than ``score`` at the same gamma, its tokens getting another expert instead of losing
      one, while costing less loss: issue 27's balanced model, held out, +0.005% against
      +0.016% perplexity at gamma 1.25), so the mixed knapsack leans to ``score``;
    - *the check*: these combinations and, per policy, the largest uniform gamma reaching
      ``target`` are measured on all layers at once (one pass per distinct setting, memoised
      in ``cache`` across targets); among those reaching ``target`` the least KL wins
      (``check="kl"``), or the least calibration loss (``check="loss"``: unbiased across
      policies, paired, but on 64 windows of 256 tokens its noise, ~1e-4 nats, exceeds the
      balanced model's differences, and it does not see that a less capped setting costs
      less). A uniform choice is written per layer and flagged in
      ``measured["uniform_equivalent"]`` (also when a per-layer combination gives every
      layer the same setting). A combination short of the target tightens the budget by the
      shortfall (``repair_rounds``).

    ``cache``: a dict kept across calls on the same model and batches (several targets): the
    capacity-off pass, the per-layer and the uniform measurements are taken once. The result
    records every candidate in ``measured["check"]``. ``batches``: input-id tensors [B, S].
    """
    from . import config
    from .calibrate import Calibration

    if check not in ("kl", "loss"):
        raise ValueError(f"check={check!r}: expected 'kl' or 'loss'")
    batches = list(batches)
    if compiled is None:
        compiled = torch.compile(model, backend="capmoe", dynamic=False)
    cache = {} if cache is None else cache
    if "off" not in cache:
        with config.patch(capacity_factor=None):
            cache["off"] = _candidate_pass(compiled, batches)
    off, _ = cache["off"]
    names = list(off["before"])
    total_before = sum(off["before"].values())
    measure = _measurer(model, compiled, batches, cache)
    if "layers" not in cache:
        cache["layers"] = _layer_table(measure, off, policies, gammas, stop_kl)

    def uniform(g, policy):
        if (g, policy) not in cache:
            layers = {n: {"capacity_factor": g, "policy": policy} for n in names}
            row = {"kind": f"uniform gamma={g} {policy}", "layers": layers}
            row.update(measure(layers))
            cache[(g, policy)] = row
        return cache[(g, policy)]

    rows = _per_layer_rows(cache["layers"], total_before, target, measure, repair_rounds)
    if len(policies) > 1:
        for policy in policies:
            table = _restrict(cache["layers"], policy)
            kind = f"per-layer {policy}"
            rows += _per_layer_rows(table, total_before, target, measure, repair_rounds, kind)
    for policy in policies:
        for g in sorted(gammas, reverse=True):
            row = uniform(g, policy)
            rows.append(row)
            if row["speedup"] >= target:
                break  # the largest gamma of this policy reaching the target
    ok = [r for r in rows if r["speedup"] >= target - 1e-9]
    if not ok:
        raise ValueError(f"target {target}: no per-layer or uniform setting reaches it")
    best = min(ok, key=lambda r: (r[check], r["kind"].startswith("uniform")))
    settings = {(o["capacity_factor"], o["policy"]) for o in best["layers"].values()}
    same = next(iter(settings)) if len(settings) == 1 else None
    return Calibration(
        best["layers"],
        target=target,
        tokens_per_call=int(batches[0].numel()),
        measured={
            "chosen": best["kind"],
            "kl": best["kl"],
            "loss": best["loss"],
            "loss_off": off["loss"],
            "speedup": best["speedup"],
            # (gamma, policy) when every layer has the same one: the choice is a uniform one
            "uniform_equivalent": None if same is None or same[0] is None else list(same),
            "passes": 1 + len(cache["measured"]),
            "check": [
                {k: v for k, v in r.items() if k not in ("layers", "before", "after", "calls")}
                for r in rows
            ],
        },
        search={"proxy": "kl", "check": check, "policies": list(policies), "gammas": list(gammas)},
    )
