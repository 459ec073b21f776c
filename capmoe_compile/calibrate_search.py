"""Calibration's search (steps 2-4 of :mod:`capmoe_compile.calibrate`'s docstring): the
per-layer sensitivity passes, the multiple-choice knapsack over the quantised MoE-time budget,
and the check-and-repair rounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import module_config
from .calibrate_measure import _changes_nothing, _Pass, _run, _submodule, model_speedup

#: ``gammas="auto"`` (the default): per layer, the gammas that would cut the layer's mean
#: per-call max/mean load ``r`` by these factors, ``gamma = r / s`` (3 decimals, >= 0.5): every
#: candidate changes something, whatever the layer's skew.
AUTO_SPEEDUPS: tuple[float, ...] = (
    1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0
)  # fmt: skip
_BUCKETS = 2000  # the MoE-time budget's quantisation: buckets per baseline


def _solve(
    choices: dict[str, list[tuple[float, int, Any]]], total_before: int
) -> tuple[list[float], list[list[int]]]:
    """Multiple-choice knapsack by dynamic programming over the quantised MoE-time budget.

    ``choices[layer]`` is a list of ``(loss_increase, max_after, label)``. Returns ``best``,
    ``best[b]`` = the least summed loss increase whose quantised summed max load is at most
    ``b`` buckets (non-increasing in ``b``), and per layer the choice made at each bucket.
    """
    inf = float("inf")
    best = torch.zeros(_BUCKETS + 1, dtype=torch.float64)  # no layer yet: every budget is free
    picks: list[list[int]] = []
    for layer_choices in choices.values():
        new = torch.full((_BUCKETS + 1,), inf, dtype=torch.float64)
        arg = torch.full((_BUCKETS + 1,), -1, dtype=torch.long)
        for i, (delta, max_after, _) in enumerate(layer_choices):
            cost = _cost(max_after, total_before)
            if cost > _BUCKETS:
                continue
            cand = torch.full((_BUCKETS + 1,), inf, dtype=torch.float64)
            cand[cost:] = best[: _BUCKETS + 1 - cost] + delta
            better = cand < new  # strict: ties keep the earlier choice
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(i), arg)
        picks.append(arg.tolist())
        best = new
    return best.tolist(), picks


def _cost(max_after: float, total_before: int) -> int:
    """Buckets of ``_BUCKETS`` per baseline MoE time, rounded up (never optimistic)."""
    return math.ceil(max_after * _BUCKETS / total_before - 1e-9)


def _backtrack(choices, picks, bucket: int, total_before: int) -> dict[str, int]:
    names = list(choices)
    out: dict[str, int] = {}
    b = bucket
    for li in range(len(names) - 1, -1, -1):
        idx = picks[li][b]
        if idx < 0:
            raise RuntimeError("calibration: no feasible choice (internal error)")
        out[names[li]] = idx
        b -= _cost(choices[names[li]][idx][1], total_before)
    return {n: out[n] for n in names}


def _measure(compiled, root, batches, policies, gammas, stop_loss, say):
    """Steps 1 and 2 of the search: the baseline pass and the per-layer sensitivity passes."""
    say("baseline pass (capacity off; its first call compiles the model)")
    base = _run(compiled, batches, keep_calls=True)
    passes = 1
    if not base.max_before:
        raise ValueError("calibrate: no MoE layer of the model was matched by the capmoe passes")
    names = list(base.max_before)
    top_k = {}
    for name in names:
        calls = base.calls[name]
        top_k[name] = round(sum(calls[0][1:]) / calls[0][0]) if calls[0][0] else 1
    say(f"baseline loss {base.loss:.4f}, {len(names)} layers, T={base.tokens_per_call}")

    # per layer: (policy, gamma) -> (loss increase, summed max load after)
    table: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        module = _submodule(root, name)
        rows: list[dict[str, Any]] = []
        for policy in policies:
            worst = 0.0
            for gamma in _layer_gammas(gammas, base.calls[name], top_k[name]):
                if _changes_nothing(base.calls[name], gamma, top_k[name]):
                    continue
                module_config.configure(module, capacity_factor=gamma, policy=policy)
                res = _run(compiled, batches)
                passes += 1
                raw = res.loss - base.loss
                worst = max(worst, raw, 0.0)  # monotone, clamped at 0
                rows.append(
                    {
                        "policy": policy,
                        "capacity_factor": gamma,
                        "loss_increase": worst,
                        "loss_increase_raw": raw,
                        "max_after": res.max_after[name],
                    }
                )
                say(
                    f"{name} {policy} gamma={gamma}: d loss {raw:+.4f}, "
                    f"layer speedup {base.max_before[name] / res.max_after[name]:.3f}x"
                )
                if worst > stop_loss:
                    break
        module_config.clear(module)
        table[name] = rows

    return base, table, passes


def _layer_gammas(gammas, calls: list[list[int]], top_k: int) -> list[float]:
    if gammas != "auto":
        return list(gammas)
    ratios = [max(row[1:]) / (row[0] * top_k / (len(row) - 1)) for row in calls if row[0]]
    r = sum(ratios) / len(ratios) if ratios else 1.0
    return sorted({round(r / s, 3) for s in AUTO_SPEEDUPS if r / s >= 0.5}, reverse=True)


@dataclass
class _Combination:
    """Step 3 of the search, solved once for every budget: per layer, the choices ``(loss
    increase, max_after, sensitivity row or None for off)``, and the knapsack's answer."""

    choices: dict[str, list[tuple[float, int, Any]]]
    total_before: int
    best: list[float]  # least predicted loss increase within b buckets
    picks: list[list[int]]  # per layer, the choice made at each bucket
    fastest: int  # the fewest buckets any combination fits in
    reachable: float  # the largest predicted speedup

    @classmethod
    def solve(cls, base: _Pass, table: dict[str, list[dict[str, Any]]]) -> _Combination:
        total_before = sum(base.max_before.values())
        # the tiny max_after term breaks ties between equal losses towards the faster choice
        choices = {
            name: [(0.0, base.max_before[name], None)]
            + [
                (r["loss_increase"] + 1e-12 * r["max_after"] / total_before, r["max_after"], r)
                for r in table[name]
            ]
            for name in base.max_before
        }
        best, picks = _solve(choices, total_before)
        fastest = next(i for i, v in enumerate(best) if v < float("inf"))
        reachable = _BUCKETS / fastest if fastest else float("inf")
        return cls(choices, total_before, best, picks, fastest, reachable)

    def pick(self, goal: int | None, loss_budget: float | None) -> tuple[dict[str, int], int]:
        """Each layer's choice (an index into ``choices``) and the bucket it was made at: at
        ``goal`` buckets, or with ``goal=None`` the fewest buckets within ``loss_budget``."""
        if goal is None:
            b = next(i for i, v in enumerate(self.best) if v <= loss_budget)
        else:
            b = goal
        return _backtrack(self.choices, self.picks, b, self.total_before), b

    def layers_of(self, sel: dict[str, int], policies: Sequence[str]) -> dict[str, dict]:
        """The per-layer options of a selection, as :class:`Calibration` ``layers``."""
        out = {}
        for name, idx in sel.items():
            row = self.choices[name][idx][2]
            out[name] = (
                {"capacity_factor": None, "policy": policies[0]}
                if row is None
                else {"capacity_factor": row["capacity_factor"], "policy": row["policy"]}
            )
        return out


def _target_buckets(
    target: float | None, comb: _Combination, policies: Sequence[str]
) -> int | None:
    """The first goal of a ``target`` search, in buckets (``None`` for a quality budget)."""
    if target is None:
        return None
    goal = math.floor(_BUCKETS / target + 1e-9)
    if goal < comb.fastest:
        raise ValueError(
            f"calibrate: target {target}x is out of reach with the gammas tried and "
            f"policies {list(policies)}: at most {comb.reachable:.3f}x predicted"
        )
    return goal


def _check_pass(compiled, root: nn.Module, batches, layers: dict[str, dict]) -> _Pass:
    """Step 4's pass: every layer of ``layers`` configured at once, cleared after."""
    for name, opts in layers.items():
        module_config.configure(_submodule(root, name), **opts)
    res = _run(compiled, batches)
    for name in layers:
        module_config.clear(_submodule(root, name))
    return res


def _tighter_goal(bucket: int, speedup: float, target: float, fastest: int) -> int | None:
    """The next goal of a ``target`` search whose check measured ``speedup`` at ``bucket``,
    tightened by the shortfall (the layers after a capped one saw other loads); ``None``
    when the target is met or no combination is faster."""
    if speedup >= target - 1e-9:
        return None
    new_goal = math.floor(bucket * speedup / target)
    if new_goal >= bucket:
        new_goal = bucket - 1
    if new_goal < fastest:
        return None
    return new_goal


def _tighter_budget(
    loss_budget: float, predicted: float, measured: float, max_ppl_increase: float
) -> float | None:
    """The next predicted-loss budget of a quality search: if the layers together cost more
    than their sum, shrunk by the overshoot; ``None`` when the check is within budget."""
    full = math.log1p(max_ppl_increase)
    if measured <= full or predicted <= 0:
        return None
    return min(loss_budget * 0.999, predicted * full / measured)


@dataclass
class _Checked:
    """Step 4's outcome: the last round's choice, its prediction and its check pass."""

    layers: dict[str, dict[str, Any]]
    predicted_loss: float
    predicted_after: dict[str, int]
    res: _Pass
    rounds: list[dict[str, Any]]


def _check_and_repair(
    compiled,
    root: nn.Module,
    batches: list[Any],
    base: _Pass,
    comb: _Combination,
    *,
    policies: tuple[str, ...],
    target: float | None,
    max_ppl_increase: float | None,
    repair_rounds: int,
    say,
) -> _Checked:
    """Steps 3 and 4 in rounds: pick a combination, check it with one pass, and (up to
    ``repair_rounds`` times) tighten the goal and pick again."""
    loss_budget = None if max_ppl_increase is None else math.log1p(max_ppl_increase)
    goal = _target_buckets(target, comb, policies)
    rounds = []
    while True:
        sel, bucket = comb.pick(goal, loss_budget)
        layers = comb.layers_of(sel, policies)
        predicted_loss = sum(comb.choices[n][i][0] for n, i in sel.items())
        predicted_after = {n: comb.choices[n][i][1] for n, i in sel.items()}
        res = _check_pass(compiled, root, batches, layers)
        speedup = model_speedup(base.max_before, res.max_after)
        rounds.append(
            {
                "layers": layers,
                "predicted_speedup": model_speedup(base.max_before, predicted_after),
                "measured_speedup": speedup,
                "measured_loss_increase": res.loss - base.loss,
            }
        )
        say(f"check: speedup {speedup:.3f}x, d loss {res.loss - base.loss:+.4f}")
        if len(rounds) > repair_rounds:
            break
        if target is None:
            measured = res.loss - base.loss
            loss_budget = _tighter_budget(loss_budget, predicted_loss, measured, max_ppl_increase)
            if loss_budget is None:
                break
            continue
        goal = _tighter_goal(bucket, speedup, target, comb.fastest)
        if goal is None:
            break
    return _Checked(layers, predicted_loss, predicted_after, res, rounds)
