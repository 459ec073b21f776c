"""Bridging the graph breaks between a router and its experts, for capmoe's compiles only.

Two things break a layer's graph between the top-k and the experts:

- data-dependent shapes and scalars: ``torch.where(mask)``, ``nonzero``, ``.item()`` in a loop
  over experts. Dynamo captures them (as unbacked sizes) when ``capture_dynamic_output_shape_ops``
  and ``capture_scalar_outputs`` are set;
- a loop whose *length* is data: transformers' ``experts_implementation="eager"`` iterates
  ``for expert_idx in expert_hit`` where ``expert_hit = mask.nonzero()`` (the experts hit in
  this call). Dynamo cannot unroll a loop of unknown length.

:func:`capture_context` is the capmoe backend's ``backend_ctx_ctor``: Dynamo enters it around
every call of a model compiled with ``backend="capmoe"`` (tracing, guards and the compiled code),
and nowhere else, so another ``torch.compile`` in the same process keeps the global settings.
Inside it, each frame is traced first with the two Dynamo flags set, and again without them
(as ``backend="inductor"`` traces it) when that trial fails or leaves a data-dependent value
no rewrite took (see "the capture flags, per frame" below); and a transformers experts module
running its ``eager`` implementation runs :func:`bridged_forward` of its own ``forward`` instead: the same
source with the loop over the hit experts turned into a loop over *every* expert index (the
``nonzero`` replaced by the list of all indices). That is the same computation: an expert no
token chose selects no rows, and the loop body (checked by ``bridge_loop._loop_ok``: only plain
assignments, the skip of the sentinel index and an ``index_add_`` into the accumulator) adds
nothing for it, in the same order for the others. A forward that does not have that shape runs
as written (and its graph still breaks; ``explain`` says where).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from .bridge_loop import bridged_forward as bridged_forward
from .bridge_loop import every_index as every_index
from .bridge_loop import why_not_bridged as why_not_bridged


def _forward_backend_ctx() -> None:
    """Let a backend's ``backend_ctx_ctor`` reach Dynamo through ``torch.compile``.

    ``torch.compile(model, backend="capmoe", ...)`` hands Dynamo a ``_TorchCompileWrapper``
    around the backend, and Dynamo reads ``backend_ctx_ctor`` off that wrapper (through
    ``WrapBackendDebug``, which copies the wrapper's instance attributes), where it is never
    set: the attribute the backend declares is lost. This property on ``WrapBackendDebug``
    answers with the one its own attributes hold, as before, else the wrapped backend's
    ``compiler_fn``'s; a backend that declares none is unaffected (the getter raises
    ``AttributeError``, and Dynamo uses its null context as before)."""
    from torch._dynamo.repro.after_dynamo import WrapBackendDebug

    if isinstance(WrapBackendDebug.__dict__.get("backend_ctx_ctor"), property):
        return

    def get(self):
        own = self.__dict__
        if "backend_ctx_ctor" in own:
            return own["backend_ctx_ctor"]
        inner = getattr(own.get("_torchdynamo_orig_backend"), "compiler_fn", None)
        ctor = getattr(inner, "backend_ctx_ctor", None)
        if ctor is None:
            raise AttributeError("backend_ctx_ctor")
        return ctor

    def set_(self, value):
        self.__dict__["backend_ctx_ctor"] = value

    WrapBackendDebug.backend_ctx_ctor = property(get, set_)


_forward_backend_ctx()


class capture_context:  # noqa: N801 - used as a function: Dynamo calls backend_ctx_ctor()
    """The transformers eager-experts bridge, for one compiled call; the capture flags are set
    per frame, during its trace only (:func:`_install_frame_hooks`, installed on first entry).

    A plain class, not ``contextlib.contextmanager``: Dynamo enters it on every call of the
    compiled model, so entering and leaving must cost microseconds (``config.patch`` costs
    tens of them)."""

    __slots__ = ("_interface", "_swapped")

    def __enter__(self) -> None:
        if not _hooks_installed:
            _install_frame_hooks()
        interface = _experts_interface()
        self._interface = None
        if interface is not None and "eager" not in interface._local_mapping:
            _scan()
            interface._local_mapping["eager"] = _eager_experts
            self._interface = interface
        # experts classes without the decorator whose own forward has the loop: their class
        # runs the bridged forward for the duration of the call (restored on exit)
        first = _SWAPS[0] if _SWAPS else None
        self._swapped = tuple(_SWAPS) if first and first[0].forward is first[1] else ()
        for cls, _, bridged in self._swapped:
            cls.forward = bridged

    def __exit__(self, *exc) -> None:
        for cls, original, _ in self._swapped:
            cls.forward = original
        if self._interface is not None:
            self._interface._local_mapping.pop("eager", None)


# --- the capture flags, per frame ------------------------------------------------------------
#
# The flags change how *every* frame traces, not only the layers they are for: with them a
# ``counts.tolist()`` feeding ``torch.split`` becomes unbacked sizes that later raise
# ``GuardOnDataDependentSymNode`` (where Inductor breaks the graph and runs), and a loop over a
# ``ModuleList`` of experts that no pass rewrites is captured whole, so Inductor fuses across what
# were graph breaks and (in bf16) computes something else than it does without them. So a frame
# of a bridged compile is traced with the flags first, and traced again without them (as
# ``backend="inductor"`` traces it) when that trial fails, or when the graph it gave still holds
# a data-dependent value after the backend's passes (the flags let in something no rewrite
# took out). A frame keeps them only where a rewrite consumed everything they captured.

_hooks_installed = False
_trial = False  # True while a frame is traced with the flags this module turned on
# code object -> why its last trace with the flags was dropped (for explain and debugging)
RETRACED: dict[Any, str] = {}
# lists that collect the passes' reports of graphs dropped by check_capture_used, with the reason
# (explain's, while it runs a call: a site seen only in a dropped trial is still reported)
DROPPED_SINKS: list[list[tuple[list, str]]] = []


class RetraceWithoutCapture(torch._dynamo.exc.ShortenTraceback):
    """Raised (by :func:`check_capture_used` or a failed trial) while a frame is traced with
    the capture flags: the frame is traced again without them. A ``ShortenTraceback``, so that
    Dynamo lets it through a backend call unwrapped (not turned into a graph break)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, first_useful_frame=None)


def _bridged_compile(compiler_fn: Any) -> bool:
    """Whether Dynamo compiles this frame for a backend whose context is :class:`capture_context`
    (``backend="capmoe"``, ``explain``, test backends that declare it)."""
    ctor = getattr(compiler_fn, "backend_ctx_ctor", None)
    return isinstance(ctor, type) and issubclass(ctor, capture_context)


def data_dependent_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The live nodes of ``gm`` whose value holds an unbacked symbol its inputs did not give it:
    what only the capture flags let into a graph (``nonzero``, ``torch.where(mask)``, ``item``,
    ``tolist``, boolean indexing, ...). Dead nodes a rewrite left behind do not count."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    from .passes.fx_util import meta_value

    def unbacked(n: torch.fx.Node) -> set:
        val = meta_value(n)
        try:
            return set(free_unbacked_symbols(val)) if val is not None else set()
        except Exception:  # noqa: BLE001 - a value free_unbacked_symbols cannot walk
            return set()

    nodes = list(gm.graph.nodes)
    given: set = set()
    for n in nodes:
        if n.op == "placeholder":
            given |= unbacked(n)  # mark_unbacked inputs: not the flags' doing
    live: set[torch.fx.Node] = set()
    for n in reversed(nodes):
        target = getattr(n.target, "__name__", str(n.target))
        if (
            n.op == "output"
            or any(u in live for u in n.users)
            or (n.op in ("call_method", "call_function") and target.endswith("_"))
            or (n.op == "call_function" and n.is_impure())
        ):
            live.add(n)
    return [
        n
        for n in nodes
        if n in live and n.op not in ("placeholder", "output") and unbacked(n) - given
    ]


def check_capture_used(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`RetraceWithoutCapture` when ``gm`` was traced with the flags this module
    turned on and, after the backend's passes, still holds a data-dependent value: the flags
    changed the graph for code no rewrite took (it then traces as with ``backend="inductor"``).
    A backend calls this after its passes and before its expensive compile; Dynamo's
    ``call_user_compiler`` calls it after every backend of a bridged compile as well."""
    if not _trial or getattr(gm, "_capmoe_capture_checked", False):
        return
    gm._capmoe_capture_checked = True
    left = data_dependent_nodes(gm)
    if left:
        names = ", ".join(sorted({getattr(n.target, "__name__", str(n.target)) for n in left}))
        why = f"data-dependent values no rewrite took: {names}"
        for sink in DROPPED_SINKS:
            sink.append((list(gm.meta.get("capmoe_reports", [])), why))
        raise RetraceWithoutCapture(why)


def _install_frame_hooks() -> None:
    """Wrap Dynamo's ``trace_frame`` (one trace of one frame) and
    ``OutputGraph.call_user_compiler`` (one backend call): for a frame of a bridged compile, the
    first trace runs with both flags, and a failure or :func:`check_capture_used` restarts the
    frame's analysis without them (Dynamo's own ``RestartAnalysis`` loop, as a graph break
    does). Other compiles are untouched: the wrappers call through."""
    global _hooks_installed
    from torch._dynamo import convert_frame
    from torch._dynamo.output_graph import OutputGraph

    _hooks_installed = True
    if getattr(convert_frame.trace_frame, "_capmoe_wrapped", False):
        return
    trace_frame = convert_frame.trace_frame
    call_user_compiler = OutputGraph.call_user_compiler

    @functools.wraps(trace_frame)
    def traced(code, globals_, locals_, builtins, closure, compiler_fn, tf_mode_stack,
               one_graph, speculation_log, *args, **kwargs):  # fmt: skip
        global _trial
        cfg = torch._dynamo.config
        prev = (cfg.capture_scalar_outputs, cfg.capture_dynamic_output_shape_ops)
        trial = (
            not one_graph  # fullgraph captures data-dependent values anyway
            and prev != (True, True)  # the user's own flags: nothing to take back
            and not getattr(speculation_log, "_capmoe_plain", False)
            and _bridged_compile(compiler_fn)
        )
        outer = _trial
        _trial = trial
        if trial:
            cfg.capture_scalar_outputs = cfg.capture_dynamic_output_shape_ops = True
        try:
            return trace_frame(code, globals_, locals_, builtins, closure, compiler_fn,
                               tf_mode_stack, one_graph, speculation_log, *args, **kwargs)  # fmt: skip
        except (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame):
            raise
        except Exception as e:
            # a bad option (backend.OptionError; not imported: backend imports this module)
            if not trial or type(e).__name__ == "OptionError":
                raise
            RETRACED[code] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            speculation_log.clear()  # the trial's graph breaks were found with the flags
            speculation_log._capmoe_plain = True
            restart = torch._dynamo.exc.RestartAnalysis(
                restart_reason=f"capmoe: traced again without capture flags ({RETRACED[code]})"
            )
            restart._torch_dynamo_tracer_output = getattr(e, "_torch_dynamo_tracer_output", None)
            raise restart from e
        finally:
            _trial = outer
            cfg.capture_scalar_outputs, cfg.capture_dynamic_output_shape_ops = prev

    def checked(self, gm, example_inputs):
        compiled = call_user_compiler(self, gm, example_inputs)
        check_capture_used(gm)
        return compiled

    traced._capmoe_wrapped = True
    convert_frame.trace_frame = traced
    functools.update_wrapper(checked, call_user_compiler)
    OutputGraph.call_user_compiler = checked


def _experts_interface():
    """transformers' experts-implementation registry, if transformers is already imported."""
    mod = sys.modules.get("transformers.integrations.moe")
    return getattr(mod, "ALL_EXPERTS_FUNCTIONS", None) if mod is not None else None


def _eager_experts(self, *args, **kwargs):
    """What an experts module whose implementation is ``eager`` runs under capmoe: its own
    forward, with the loop over hit experts bridged where :func:`bridged_forward` can.

    Dynamo traces this function: the bridged forward is looked up in a plain dict filled
    before tracing (:func:`_scan`: an attribute of the original function), never built while
    tracing.

    The caller is the decorated forward of the first class in ``type(self)``'s MRO that
    defines one: a subclass may override ``forward`` undecorated and call ``super().forward``
    (transformers' Ergo repeats each token k times, then runs its parent's decorated experts),
    so ``type(self).forward`` may be the subclass's, which would call back here for ever."""
    original = _decorated_forward(type(self))
    return getattr(original, "_capmoe_bridged", original)(self, *args, **kwargs)


def _decorated_forward(cls: type):
    """The original (undecorated) forward behind the first ``use_experts_implementation``
    forward in ``cls``'s MRO: what transformers' own "eager" implementation runs."""
    for c in cls.__mro__:
        fwd = c.__dict__.get("forward")
        original = getattr(fwd, "__wrapped__", None)
        if original is not None:
            return original
    raise TypeError(
        f"capmoe: {cls.__qualname__} dispatches its experts through transformers' experts "
        "interface but no class in its MRO has a decorated forward"
    )


_scanned_modules = -1


def _scan() -> None:
    """Bridge the eager forward of every transformers experts class (a class decorated with
    ``use_experts_implementation``) in the modules loaded so far; again only when more are."""
    global _scanned_modules
    if len(sys.modules) == _scanned_modules:
        return
    _scanned_modules = len(sys.modules)
    for name, mod in list(sys.modules.items()):
        ns = getattr(mod, "__dict__", None)
        if not isinstance(ns, dict):
            continue
        decorated = "use_experts_implementation" in ns
        if not decorated and not name.startswith("transformers.models."):
            continue
        for cls in list(ns.values()):
            fwd = getattr(cls, "forward", None) if isinstance(cls, type) else None
            if fwd is None or getattr(cls, "__module__", None) != name:
                continue
            original = getattr(fwd, "__wrapped__", None)
            if original is not None and "experts_interface" in fwd.__code__.co_freevars:
                if not hasattr(original, "_capmoe_bridged"):
                    original._capmoe_bridged = bridged_forward(original)
            elif (
                original is None
                and cls.__name__.endswith("Experts")
                and issubclass(cls, torch.nn.Module)
                and "forward" in cls.__dict__
                and all(c is not cls for c, _, _ in _SWAPS)
            ):
                # an experts class transformers did not decorate (Step-3.5's)
                bridged = bridged_forward(fwd)
                if bridged is not fwd:
                    _SWAPS.append((cls, fwd, bridged))


# (class, its forward, the bridged forward): undecorated experts classes swapped per call
_SWAPS: list[tuple[type, Callable, Callable]] = []
