"""Per-layer capacity calibration: which gamma (and policy) for which MoE layer.

    cal = capmoe_compile.calibrate(model, batches, target=1.3)   # or max_ppl_increase=0.01
    cal.save("calibration.json")
    ...
    cal = capmoe_compile.Calibration.load("calibration.json")
    cal.apply(model)                       # capmoe_compile.configure, one call per named layer
    compiled = torch.compile(model, backend="capmoe")

What it optimises
-----------------
The **modeled expert-parallel speedup of the model** is SPEC.md's per-layer figure combined
over layers and calls as a ratio of sums::

    speedup = sum_{layer, call} max_load_before / sum_{layer, call} max_load_after

i.e. every MoE layer call is assumed to cost time proportional to its most loaded expert (the
straggler), at equal per-token expert cost in every layer, and the model's MoE time is the sum
of its layers' times (layers run one after another). A layer's own speedup ``s_l`` enters with
weight ``max_load_before_l``: the model-level figure is the harmonic mean of the ``s_l``
weighted by each layer's share of the MoE time before capacity. Attention and everything else
outside the MoE layers are excluded (as in ``benchmarks/quality.py``).

The **loss** is next-token cross-entropy (nats per token) on the calibration batches.

The search
----------
1. *Baseline* (1 forward pass over the calibration batches, capacity off): the loss, and every
   layer's per-call expert loads from :func:`capmoe_compile.record_stats`.
2. *Per-layer sensitivity* (one pass per layer x policy x gamma that changes anything): only
   that layer is capped (``configure``), every other layer is off; record the loss increase
   ``d_l(p, g)`` and the layer's summed max load after capacity ``M_l(p, g)``. A gamma whose
   capacity is at least every call's largest load leaves the layer exactly as written (SPEC.md
   invariant 2), so it costs no pass; a layer's descent stops once its loss increase passes
   ``stop_loss`` nats. The increases are regularised against noise: clamped at 0 and made
   monotone (a smaller gamma never looks better than a larger one of the same policy).
3. *Combination* (no passes): assume the increases add up and pick one choice per layer
   (off, or a policy and gamma) minimising ``sum_l d_l`` subject to
   ``sum_l M_l <= sum_l B_l / target`` (a multiple-choice knapsack, solved exactly by dynamic
   programming over the MoE-time budget quantised to ``1/2000`` of the baseline, costs rounded
   up). With ``max_ppl_increase`` instead of ``target``: the fastest choice whose predicted
   perplexity increase is within the budget.
4. *Check* (1 pass, up to ``repair_rounds`` more): apply the choice to every layer at once and
   measure loss and speedup on the calibration batches. Capping one layer changes the hidden
   states, hence the loads, of the layers after it; if the measured speedup falls short of the
   target, the budget is tightened by the shortfall and step 3 rerun.

Cost: one compile (the capacity options are read at run time, so no per-candidate recompile),
and ``2 + sum_l (passes of layer l) + repairs`` forward passes over the calibration batches,
at most ``2 + L * P * G + repair_rounds`` for L layers, P policies and G gammas per layer,
with no backward pass; the combination step is ``O(L * P * G * 2000)`` arithmetic. For a
32-layer model, one policy and the 15 automatic gammas that is at most ~480 passes, fewer
when sensitive layers stop early (a 4-layer model: at most 62). Calibrate
with batches of the shape you serve: gamma is relative to the mean load ``T * k / E``, and how
far the largest load exceeds it depends on ``T``.

A policy that changes a layer's output width (``routing.widens``: ``expanded_drop``) is not
searched: the width is fixed when the graph is compiled, so such a policy cannot be mixed
per layer with the other policies in one graph.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config, module_config
from .calibrate_measure import _as_inputs, _own_overrides, _Pass, _run, _submodule, _unwrap
from .calibrate_measure import model_speedup as model_speedup
from .calibrate_search import AUTO_SPEEDUPS as AUTO_SPEEDUPS
from .calibrate_search import _check_and_repair, _Checked, _Combination, _measure
from .routing import POLICIES, widens

__all__ = ["DEFAULT_GAMMAS", "SEARCH_POLICIES", "Calibration", "calibrate", "model_speedup"]

#: Fixed gammas, for ``gammas=DEFAULT_GAMMAS`` (largest first).
DEFAULT_GAMMAS: tuple[float, ...] = (3.0, 2.5, 2.0, 1.75, 1.5, 1.375, 1.25, 1.125, 1.0, 0.875, 0.75)
#: Policies that keep a layer's output width (all but ``expanded_drop``), so any mix of them
#: runs in one compiled graph.
SEARCH_POLICIES: tuple[str, ...] = tuple(p for p in POLICIES if not widens(p))

FORMAT = "capmoe-calibration"
FORMAT_VERSION = 1
_LAYER_KEYS = ("capacity_factor", "policy")


# --------------------------------------------------------------------------------------------
# the configuration object
# --------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Per-layer capacity options, and how they were found.

    ``layers`` maps a module path (the names :func:`capmoe_compile.record_stats` reports, e.g.
    ``"model.layers.3.mlp"``) to ``{"capacity_factor": gamma or None, "policy": name}``.
    ``None`` leaves that layer as written even when the global configuration sets a gamma.
    Layers not named keep whatever the global configuration says.

    The remaining fields are a record (not applied): the target, the tokens per call the
    calibration saw, the predicted and measured loss and speedup on the calibration batches,
    and the search's cost and per-layer sensitivities.
    """

    layers: dict[str, dict[str, Any]]
    target: float | None = None
    max_ppl_increase: float | None = None
    tokens_per_call: int | None = None
    predicted: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = _check_layers(self.layers)

    # -- applying ---------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> nn.Module:
        """``configure`` every named layer of ``model`` (its ``capacity_factor`` and
        ``policy``); returns ``model``. ``ValueError`` if a name is not a submodule of
        ``model`` holding parameters (per-module options follow a layer's weights). Nothing is
        configured unless every name resolves."""
        modules = {name: _submodule(model, name) for name in self.layers}
        for name, opts in self.layers.items():
            module_config.configure(modules[name], **opts)
        return model

    def clear(self, model: nn.Module) -> nn.Module:
        """Remove every per-module override of the named layers (not only this calibration's)."""
        for name in self.layers:
            module_config.clear(_submodule(model, name))
        return model

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        compiled: Any = None,
        progress: Callable[[str], None] | None = None,
    ) -> dict:
        """Loss and modeled speedup of this calibration on ``batches`` (e.g. held-out text)
        against capacity off: two passes. Other per-module overrides are set aside meanwhile.
        ``progress`` receives a message per batch (``"capacity off: batch 3 of 32"``).
        """
        root = _unwrap(model)
        if compiled is None:
            compiled = torch.compile(root, backend="capmoe", dynamic=False)
        batches = list(batches)
        with _own_overrides(root), config.patch(capacity_factor=None):
            off = _run(compiled, batches, tick=_ticker(progress, "capacity off"))
            self.apply(root)
            on = _run(compiled, batches, tick=_ticker(progress, "calibrated"))
        return {
            "loss_off": off.loss,
            "loss": on.loss,
            "ppl_change": math.expm1(on.loss - off.loss),
            "speedup": model_speedup(off.max_before, on.max_after),
            "tokens_scored": on.tokens,
        }

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layers": {name: dict(opts) for name, opts in self.layers.items()},
            "target": self.target,
            "max_ppl_increase": self.max_ppl_increase,
            "tokens_per_call": self.tokens_per_call,
            "predicted": self.predicted,
            "measured": self.measured,
            "search": self.search,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object) -> Calibration:
        if not isinstance(data, dict):
            raise ValueError(f"a capmoe calibration is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a capmoe calibration (format={data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported calibration version {data.get('version')!r}")
        known = {"format", "version", *cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown calibration field(s): {', '.join(unknown)}")
        if "layers" not in data:
            raise ValueError("calibration has no 'layers'")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        for name in ("predicted", "measured", "search"):
            if not isinstance(fields.get(name, {}), dict):
                raise ValueError(f"calibration field {name!r} must be an object")
        for name in ("target", "max_ppl_increase"):
            value = fields.get(name)
            if value is not None and not _positive(value):
                raise ValueError(f"calibration field {name!r} must be a positive number")
        tokens = fields.get("tokens_per_call")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
            raise ValueError("calibration field 'tokens_per_call' must be an integer")
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:  # already a ValueError; say what it was
            raise ValueError(f"calibration is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text())

    def __str__(self) -> str:
        lines = []
        for name, opts in self.layers.items():
            g = opts["capacity_factor"]
            lines.append(f"  {name:<32} {'off' if g is None else g:>6} {opts['policy']}")
        head = "capmoe calibration"
        if self.target is not None:
            head += f", target {self.target:g}x"
        if self.max_ppl_increase is not None:
            head += f", max perplexity increase {self.max_ppl_increase:.2%}"
        m = self.measured
        if m:
            head += (
                f": calibration set speedup {m['speedup']:.3f}x, perplexity {m['ppl_change']:+.2%}"
            )
        return head + "\n" + "\n".join(lines)


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_layers(layers: object) -> dict[str, dict[str, Any]]:
    if not isinstance(layers, Mapping):
        raise ValueError("calibration 'layers' must map layer names to options")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"calibration layer name must be a non-empty string, got {name!r}")
        if not isinstance(opts, Mapping):
            raise ValueError(f"calibration layer {name!r}: options must be an object")
        unknown = sorted(set(opts) - set(_LAYER_KEYS))
        if unknown:
            raise ValueError(f"calibration layer {name!r}: unknown option(s) {unknown}")
        if set(opts) != set(_LAYER_KEYS):
            raise ValueError(f"calibration layer {name!r}: needs both of {list(_LAYER_KEYS)}")
        out[name] = {key: config.validate(key, opts[key]) for key in _LAYER_KEYS}
    return out


def _ticker(progress: Callable[[str], None] | None, what: str):
    """``tick(i, n)`` for :func:`_run`: hands ``"<what>: batch i of n"`` to ``progress``."""
    if progress is None:
        return None
    return lambda i, n: progress(f"{what}: batch {i} of {n}")


# --------------------------------------------------------------------------------------------
# the search's entry point (its steps: calibrate_measure.py, calibrate_search.py)
# --------------------------------------------------------------------------------------------


def _reused(reuse: Calibration, policies, gammas, batches) -> tuple[_Pass, dict]:
    """The baseline and sensitivities recorded by an earlier calibration of the same model on
    the same batches (checked: policies, gammas and scored tokens must match)."""
    rec = reuse.search
    if "baseline" not in rec or "sensitivity" not in rec:
        raise ValueError("reuse= needs a calibration that recorded its baseline and sensitivity")
    if rec.get("policies") != list(policies) or rec.get("gammas") != gammas:
        raise ValueError("reuse= was searched over other policies or gammas")
    scored = sum(_as_inputs(b)[1][:, 1:].numel() for b in batches)
    if rec["baseline"]["tokens_scored"] != scored and not any(
        _as_inputs(b)[2] is not None for b in batches
    ):
        raise ValueError("reuse= was measured on other batches")
    b = rec["baseline"]
    base = _Pass(b["loss"], b["tokens_scored"], {}, dict(b["max_before"]), {}, b["tokens_per_call"])
    return base, rec["sensitivity"]


def _reporter(progress: bool | Callable[[str], None], t0: float):
    """``say(msg)``: prints ``msg`` with the seconds since ``t0`` if ``progress`` is True, hands
    it to ``progress`` if that is a callable (``capmoe calibrate``'s status line), else nothing."""

    def say(msg: str) -> None:
        if callable(progress):
            progress(msg)
        elif progress:
            print(f"[calibrate {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    return say


def _check_arguments(
    target: float | None,
    max_ppl_increase: float | None,
    policies: Sequence[str],
    gammas: Sequence[float] | str,
    batches: Iterable[Any],
) -> tuple[tuple[str, ...], list[float] | str, list[Any]]:
    """:func:`calibrate`'s goal, policies, gammas and batches, checked; gammas as a list,
    largest first (or ``"auto"``), and the batches as a list."""
    if (target is None) == (max_ppl_increase is None):
        raise ValueError("calibrate needs exactly one of target= or max_ppl_increase=")
    if target is not None and not (_positive(target) and target >= 1):
        raise ValueError(f"target speedup must be a number >= 1, got {target!r}")
    if max_ppl_increase is not None and not _positive(max_ppl_increase):
        raise ValueError(f"max_ppl_increase must be a positive number, got {max_ppl_increase!r}")
    policies = tuple(config.validate("policy", p) for p in policies)
    if not policies:
        raise ValueError("calibrate needs at least one policy")
    wide = [p for p in policies if widens(p)]
    if wide:
        raise ValueError(
            f"calibrate does not search {', '.join(wide)}: it changes a layer's output width, "
            "fixed when the graph is compiled, so it cannot be mixed per layer with other policies"
        )
    if gammas != "auto":
        if isinstance(gammas, str) or not gammas:
            raise ValueError(f"gammas must be 'auto' or a sequence of numbers, got {gammas!r}")
        gammas = sorted({float(config.validate("capacity_factor", g)) for g in gammas})[::-1]
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    return policies, gammas, batches


def _calibration(
    base: _Pass,
    table: dict[str, list[dict[str, Any]]],
    comb: _Combination,
    checked: _Checked,
    *,
    target: float | None,
    max_ppl_increase: float | None,
    policies: tuple[str, ...],
    gammas: list[float] | str,
    seed: int,
    stop_loss: float,
    passes: int,
    batches: int,
    t0: float,
    reused: bool,
) -> Calibration:
    """The :class:`Calibration` a finished search returns: the last round's choice, what
    was predicted and measured, and the search's record (``seconds`` since ``t0``)."""
    last = checked.rounds[-1]
    return Calibration(
        layers=checked.layers,
        target=target,
        max_ppl_increase=max_ppl_increase,
        tokens_per_call=base.tokens_per_call,
        predicted={
            "speedup": last["predicted_speedup"],
            "loss_increase": checked.predicted_loss,
            "ppl_change": math.expm1(checked.predicted_loss),
            "max_after": checked.predicted_after,
        },
        measured={
            "loss_off": base.loss,
            "loss": base.loss + last["measured_loss_increase"],
            "ppl_change": math.expm1(last["measured_loss_increase"]),
            "speedup": last["measured_speedup"],
            "max_before": base.max_before,
            "max_after": checked.res.max_after,
            "tokens_scored": base.tokens,
        },
        search={
            "policies": list(policies),
            "gammas": gammas,
            "seed": seed,
            "stop_loss": stop_loss,
            "forward_passes": passes,
            "batches": batches,
            "seconds": round(time.perf_counter() - t0, 2),
            "max_predicted_speedup": comb.reachable,
            "reused": reused,
            "baseline": {
                "loss": base.loss,
                "tokens_scored": base.tokens,
                "tokens_per_call": base.tokens_per_call,
                "max_before": base.max_before,
            },
            "rounds": checked.rounds,
            "sensitivity": table,
        },
    )


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    target: float | None = None,
    max_ppl_increase: float | None = None,
    policies: Sequence[str] = ("score",),
    gammas: Sequence[float] | str = "auto",
    seed: int = 0,
    stop_loss: float = 0.1,
    repair_rounds: int = 3,
    compiled: Any = None,
    reuse: Calibration | None = None,
    progress: bool | Callable[[str], None] = False,
) -> Calibration:
    """Search per-layer capacity factors (and, with several ``policies``, per-layer policies)
    that reach a modeled expert-parallel speedup of ``target`` at the least loss on
    ``batches``, or (``max_ppl_increase``, e.g. ``0.01``) the largest speedup whose predicted
    perplexity increase stays within the budget. Exactly one of the two must be given.

    ``batches``: input-id tensors ``[B, S]`` (or dicts with ``input_ids`` and optionally
    ``attention_mask``), all of the shape you will serve, since gamma is relative to ``T``.
    ``model`` is a causal LM returning ``.logits``; ``compiled`` may pass an already compiled
    ``torch.compile(model, backend="capmoe")`` to reuse. ``seed`` is the ``random`` policy's
    seed. ``reuse``: a calibration of the same model on the same batches, policies and gammas,
    whose baseline and per-layer measurements are reused (only steps 3 and 4 run: another
    target costs one or a few passes). Per-module overrides already on ``model`` are set aside
    during the search and restored after; nothing is applied: call :meth:`Calibration.apply`.

    How the search works, what it costs, and how per-layer speedups combine into the model's:
    see the module docstring. Deterministic for fixed inputs and ``seed`` (one compile, no
    timing; the loss is reduced in float64 in a fixed order).

    ``progress``: ``True`` prints every step (a pass's result) with the seconds since the
    start; a callable receives each step's message instead.
    """
    policies, gammas, batches = _check_arguments(
        target, max_ppl_increase, policies, gammas, batches
    )
    t0 = time.perf_counter()
    root = _unwrap(model)
    if compiled is None:
        compiled = torch.compile(root, backend="capmoe", dynamic=False)

    say = _reporter(progress, t0)
    with _own_overrides(root), config.patch(capacity_factor=None, seed=seed):
        if reuse is not None:
            base, table = _reused(reuse, policies, gammas, batches)
            passes = 0
        else:
            base, table, passes = _measure(
                compiled, root, batches, policies, gammas, stop_loss, say
            )
        comb = _Combination.solve(base, table)
        checked = _check_and_repair(
            compiled,
            root,
            batches,
            base,
            comb,
            policies=policies,
            target=target,
            max_ppl_increase=max_ppl_increase,
            repair_rounds=repair_rounds,
            say=say,
        )
    return _calibration(
        base,
        table,
        comb,
        checked,
        target=target,
        max_ppl_increase=max_ppl_increase,
        policies=policies,
        gammas=gammas,
        seed=seed,
        stop_loss=stop_loss,
        passes=passes + len(checked.rounds),
        batches=len(batches),
        t0=t0,
        reused=reuse is not None,
    )
