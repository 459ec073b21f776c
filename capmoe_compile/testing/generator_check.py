"""The differential check of a generated layer or model (:func:`check`): capmoe's compile
against a reference backend, eager and SPEC's oracle, through configuration switches between
calls (:class:`Step`, :func:`switch_steps`)."""

from __future__ import annotations

import contextlib
import dataclasses
import random

import torch
from torch import nn

from capmoe_compile.testing.generator_model import GeneratedModel, GeneratedMoE, close, oracle
from capmoe_compile.testing.generator_spec import Case, ModelSpec


@dataclasses.dataclass
class Outcome:
    spec: Case
    matched: bool
    reason: str = ""  # why capmoe left the layer as written
    wrong: str = ""  # empty unless compiled != eager (off) or != the oracle (on), or raised
    inductor: str = "aot_eager"  # what "Inductor" meant for this check: inductor or aot_eager
    reference_failed: str = ""  # the reference backend failed too: capmoe's failure not wrong
    forbidden_match: bool = False  # a layer SPEC says to leave as written was rewritten
    off_diff: float | None = None  # capmoe, capacity off: max |compiled - eager|
    reference_diff: float | None = None  # the reference backend's max |compiled - eager|
    steps: int = 0  # configuration states checked on the one compiled model
    layers_matched: tuple[bool, ...] = ()

    @property
    def verdict(self) -> str:
        if self.wrong:
            return "wrong"
        if self.reference_failed:
            return "both_failed"
        return "matched" if self.matched else "refused"


POLICIES = ("score", "order", "reroute", "random")


DEFAULTS = {"capacity_factor": None, "policy": "score", "renormalize": False, "reroute_rounds": 1}


@dataclasses.dataclass(frozen=True)
class Step:
    """One configuration state of a compiled model, reached between calls: a ``config.patch``
    around the call, per-layer ``configure`` overrides, ``exempt`` layers."""

    patch: tuple = ()  # (name, value) pairs
    configure: tuple = ()  # (layer index, ((name, value), ...)) pairs
    exempt: tuple = ()  # layer indices

    def effective(self, i: int, options: dict) -> dict:
        """Layer ``i``'s options, by SPEC/README precedence: config < options= < per-module."""
        eff = {**DEFAULTS, **dict(self.patch), **options}
        for j, over in self.configure:
            if j == i:
                eff.update(dict(over))
        if i in self.exempt:
            eff["capacity_factor"] = None
        return eff

    def describe(self) -> str:
        parts = [f"patch({', '.join(f'{k}={v!r}' for k, v in self.patch)})"]
        parts += [f"configure(layer {j}, {dict(o)})" for j, o in self.configure]
        parts += [f"exempt(layer {j})" for j in self.exempt]
        return " + ".join(parts)


def switch_steps(case: Case, gamma: float) -> tuple[list[Step], dict]:
    """The configuration states a check walks through on one compiled model, and the
    ``options=`` it compiles with: every policy of ``POLICIES`` by ``config.patch``, then a
    seeded random walk of switches (capacity off again, ``expanded_drop``, ``renormalize``,
    ``reroute_rounds``, another gamma, ``configure`` and ``exempt`` of a layer), ending off."""
    rng = random.Random(case.seed * 17 + 3)
    n_layers = len(case.layers) if isinstance(case, ModelSpec) else 1
    steps = [Step(patch=(("capacity_factor", gamma), ("policy", p))) for p in POLICIES]
    options = {"policy": rng.choice(POLICIES)} if rng.random() < 0.2 else {}

    def on(policy=None, **more):
        policy = policy or rng.choice(POLICIES)
        return (("capacity_factor", rng.choice((0.5, 0.75, 1.0, 1.25))), ("policy", policy)) + (
            tuple(more.items())
        )

    menu = [
        lambda: Step(),  # capacity off
        lambda: Step(patch=on("expanded_drop")),
        lambda: Step(patch=on(renormalize=True)),
        lambda: Step(patch=on("reroute", reroute_rounds=2)),
        lambda: Step(patch=on(), configure=((rng.randrange(n_layers), on()),)),
        lambda: Step(patch=on(), exempt=(rng.randrange(n_layers),)),
        lambda: Step(configure=((rng.randrange(n_layers), on()),)),
    ]
    for _ in range(3):
        steps.append(rng.choice(menu)())
    steps.append(Step())
    return steps, options


def _aot_eager(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


@contextlib.contextmanager
def inner_compiler(full: bool):
    """``backend="capmoe"`` as the user gets it (its own Dynamo context, options and passes);
    unless ``full``, with AOTAutograd + eager in place of Inductor's ``compile_fx``: every
    decision the passes make and the rewritten graph's functionalised trace are exercised,
    without Inductor's code generation (seconds per graph on CPU)."""
    if full:
        yield
        return
    import torch._inductor.compile_fx as cfx

    saved = cfx.compile_fx
    cfx.compile_fx = _aot_eager
    try:
        yield
    finally:
        cfx.compile_fx = saved


@contextlib.contextmanager
def _collect_reports(sink: list):
    import importlib

    explain = importlib.import_module("capmoe_compile.explain")  # the module, not the function
    explain._collecting.append(sink)
    try:
        yield
    finally:
        explain._collecting.remove(sink)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _layers_of(model: nn.Module) -> list[GeneratedMoE]:
    return list(model.layers) if isinstance(model, GeneratedModel) else [model]


def _matched_layers(model: nn.Module, sink: list) -> tuple[list[bool], list]:
    """Which generated layers capmoe rewrote (by their expert parameters), and every report."""
    from capmoe_compile.explain import _with_call_params

    layers = _layers_of(model)
    ptrs = [{p.data_ptr() for p in layer.parameters()} for layer in layers]
    matched = [False] * len(layers)
    reports, seen = [], set()
    for graph_reports, inputs in sink:
        if id(graph_reports) in seen:
            continue
        seen.add(id(graph_reports))
        for r in graph_reports:
            reports.append(r)
            if not r.matched:
                continue
            r = _with_call_params(r, inputs)
            hit = [i for i, ps in enumerate(ptrs) if any(p.data_ptr() in ps for p in r.params)]
            for i in hit or range(len(layers)):  # unattributed: count it for every layer
                matched[i] = True
    return matched, reports


def expected(
    model: nn.Module,
    x: torch.Tensor,
    got: torch.Tensor,
    step: Step,
    options: dict,
    matched: list[bool],
) -> torch.Tensor:
    """What SPEC says the compiled model computes in configuration ``step``: per layer, the
    oracle under its effective options where capmoe rewrote it (and SPEC allows it), the layer
    as written otherwise. A multi-layer model's layers are fed the compiled model's own hidden
    states (``got``), so that a routing tie broken differently upstream cannot cascade."""
    layers = _layers_of(model)

    def one(i: int, h: torch.Tensor) -> torch.Tensor:
        layer, eff = layers[i], step.effective(i, options)
        if _judged_by(layer, h, eff, matched[i]) != "oracle":
            return layer(h)
        return oracle(layer, h, min_tokens=2, **eff)

    if not isinstance(model, GeneratedModel):
        return one(0, x)
    hs = [x] + [got[i] + one(i, got[i]) for i in range(len(layers))]
    return torch.stack(hs)


def _tokens(x: torch.Tensor) -> int:
    return x.reshape(-1, x.shape[-1]).shape[0]


def _judged_by(layer: GeneratedMoE, h: torch.Tensor, eff: dict, matched: bool) -> str:
    """What SPEC holds layer ``layer``'s compiled output on input ``h`` to, in a configuration
    with effective options ``eff``: ``"oracle"`` (capacity on, capmoe rewrote it and may),
    ``"eager"`` (capacity off, or capmoe left it as written), or ``"eager: left as written"``
    (a layer SPEC forbids rewriting: capacity on must still equal eager)."""
    if not layer.may_rewrite(_tokens(h)):
        return "eager: left as written"
    if eff["capacity_factor"] is None or not matched:
        return "eager"
    return "oracle"


def _mismatch_label(model, inputs, step: Step, options: dict, matched: list[bool]) -> str:
    """What a compiled output that differs from :func:`expected` was held to, per layer: the
    SPEC oracle, eager, or eager for a layer SPEC says to leave as written (then a rewrite of
    it, not a wrong oracle, is the likely cause)."""
    layers = _layers_of(model)
    kinds = []
    for i, layer in enumerate(layers):
        eff = step.effective(i, options)
        got = {_judged_by(layer, x, eff, matched[i]) for x in inputs}
        kind = " / ".join(sorted(got))
        if "eager: left as written" in got and matched[i]:
            kind += " (yet capmoe rewrote it)"
        kinds.append(kind if len(layers) == 1 else f"layer {i}: {kind}")
    return "; ".join(kinds)


def _reference(model, inputs, eager, dynamic, inductor: bool, out: Outcome) -> None:
    """Compile ``model`` with the reference backend; its max |diff| from eager, or its failure,
    into ``out``."""
    diff = 0.0
    try:
        ref = torch.compile(model, backend="inductor" if inductor else "aot_eager", dynamic=dynamic)
        for x, want in zip(inputs, eager, strict=True):
            diff = max(diff, _max_diff(ref(x), want))
        out.reference_diff = diff
    except Exception as e:  # noqa: BLE001 - any failure of the reference is reported
        out.reference_failed = _short(e)


def check(
    case: Case,
    gamma: float = 0.5,
    inductor: bool = False,
    steps: list[Step] | None = None,
    options: dict | None = None,
) -> Outcome:
    """Differential check of one generated layer or model.

    1. The reference: ``backend="inductor"`` (``inductor=True``: always compiled first, its max
       |diff| from eager is the bar's reference) or Dynamo + AOTAutograd + eager
       (``"aot_eager"``: Dynamo's default capture, which decides what compiles, without
       Inductor's code generation; compiled only when capmoe fails, to tell a capmoe failure
       (wrong) from one the reference shares (``both_failed``)).
    2. ``backend="capmoe"`` (inner compiler Inductor's, or AOT eager: :func:`inner_compiler`):
       capacity off must equal eager, within ``max(2 x the reference's diff, 1e-5)`` with
       ``inductor=True`` (issue 23's bar) and at the dtype's tolerance (:func:`close`) with AOT
       eager (whose own diff is ~0). A multi-layer model's capacity-off output is compared end
       to end for the bar, and per layer (teacher-forced) at the dtype's tolerance.
    3. On the same compiled model, the configuration states of :func:`switch_steps`, switched
       between calls: each call must follow the new configuration (vs :func:`expected`) and
       never raise.

    A capmoe failure where the reference compiles is wrong; where the reference fails too it
    is ``both_failed`` (reported apart). ``steps`` and ``options`` replace the drawn ones."""
    from capmoe_compile import config, module_config

    torch._dynamo.reset()
    multi = isinstance(case, ModelSpec)
    model = (GeneratedModel(case) if multi else GeneratedMoE(case)).eval()
    shapes = [(3, 9), (2, 12)] if case.dynamic else [(3, 9)]  # odd T too
    inputs = [model.example(b, s, seed=case.seed + i) for i, (b, s) in enumerate(shapes)]
    for layer in _layers_of(model):
        layer.calibrate_router_cap(inputs)
    out = Outcome(case, matched=False, inductor="inductor" if inductor else "aot_eager")
    dynamic = case.dynamic or None
    if steps is None:
        steps, drawn = switch_steps(case, gamma)
        options = drawn if options is None else options
    options = options or {}
    with torch.no_grad():
        eager = [model(x) for x in inputs]
        # 2. capmoe, capacity off (1., the reference, first where its diff sets the bar)
        if inductor:
            _reference(model, inputs, eager, dynamic, inductor, out)
            torch._dynamo.reset()
        sink: list = []
        kwargs = {"options": options} if options else {}
        try:
            with inner_compiler(inductor), _collect_reports(sink):
                compiled = torch.compile(model, backend="capmoe", dynamic=dynamic, **kwargs)
                off = [compiled(x) for x in inputs]
        except Exception as e:  # noqa: BLE001
            if not inductor:  # does the reference compile it?
                torch._dynamo.reset()
                _reference(model, inputs, eager, dynamic, inductor, out)
            if not out.reference_failed:
                out.wrong = f"capmoe raised where {out.inductor} compiles: {_short(e)}"
            return out
        matched, reports = _matched_layers(model, sink)
        out.layers_matched = tuple(matched)
        out.matched = any(matched)
        out.reason = "; ".join(sorted({r.reason for r in reports if not r.matched}))
        out.forbidden_match = any(
            m and not any(layer.may_rewrite(_tokens(x)) for x in inputs)
            for m, layer in zip(matched, _layers_of(model), strict=True)
        )
        off_diff = max(_max_diff(g, w) for g, w in zip(off, eager, strict=True))
        out.off_diff = off_diff
        if inductor and out.reference_diff is not None:
            bar = max(2 * out.reference_diff, 1e-5)
            if off_diff > bar:
                tf = [
                    _max_diff(g, expected(model, x, g, Step(), options, matched))
                    for x, g in zip(inputs, off, strict=True)
                ]
                out.wrong = (
                    f"capacity off: max |compiled - eager| {off_diff:.3g} > bar {bar:.3g} "
                    f"(inductor's own {out.reference_diff:.3g}; per layer, fed the compiled "
                    f"hidden states: {max(tf):.3g})"
                )
                return out
        for x, g, want in zip(inputs, off, eager, strict=True):
            ref_out = expected(model, x, g, Step(), options, matched) if multi else want
            if not close(g, ref_out):
                out.wrong = (
                    f"capacity off: compiled != eager (max |diff| {_max_diff(g, ref_out):.3g})"
                )
                return out
        # 3. configuration switches on the same compiled model
        for step in steps:
            layers = _layers_of(model)
            try:
                with inner_compiler(inductor), config.patch(dict(step.patch)):
                    for j, over in step.configure:
                        module_config.configure(layers[j], **dict(over))
                    for j in step.exempt:
                        module_config.exempt(layers[j])
                    got = [compiled(x) for x in inputs]
            except Exception as e:  # noqa: BLE001
                out.wrong = f"raised after switching to {step.describe()}: {_short(e)}"
                return out
            finally:
                for layer in layers:
                    module_config.clear(layer)
            out.steps += 1
            for x, g in zip(inputs, got, strict=True):
                want = expected(model, x, g, step, options, matched)
                if not close(g, want):
                    out.wrong = (
                        f"{step.describe()}{' with options=' + str(options) if options else ''}: "
                        f"compiled != {_mismatch_label(model, [x], step, options, matched)} "
                        f"(max |diff| {_max_diff(g, want):.3g})"
                    )
                    return out
    torch._dynamo.reset()
    return out
