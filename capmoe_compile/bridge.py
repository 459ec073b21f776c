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
token chose selects no rows, and the loop body (checked by :func:`_loop_ok`: only plain
assignments, the skip of the sentinel index and an ``index_add_`` into the accumulator) adds
nothing for it, in the same order for the others. A forward that does not have that shape runs
as written (and its graph still breaks; ``explain`` says where).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch

# Calls a bridged loop body may not make: they could raise or differ on an expert with no rows
# (reductions over the rows, host reads), or mutate something other than the accumulator.
_FORBIDDEN_CALLS = {"item", "tolist", "max", "min", "amax", "amin", "argmax", "argmin", "numel"}

_FAILED: dict[Any, str] = {}  # code object -> why it is not bridged (for explain/debugging)


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

    def unbacked(n: torch.fx.Node) -> set:
        val = n.meta.get("example_value", n.meta.get("val"))
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
    tracing."""
    original = getattr(type(self).forward, "__wrapped__", None)
    if original is None:  # not the transformers decorator's forward: nothing to bridge
        return type(self).forward(self, *args, **kwargs)
    return getattr(original, "_capmoe_bridged", original)(self, *args, **kwargs)


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


def why_not_bridged(fn: Callable) -> str | None:
    """Why ``fn``'s expert loop is left as written, or None when it is bridged."""
    bridged_forward(fn)
    return _FAILED.get(getattr(fn, "__code__", None))


@functools.cache
def bridged_forward(fn: Callable) -> Callable:
    """``fn`` with its ``for v in mask.nonzero()`` loop over experts bridged, else ``fn``."""
    try:
        return _bridge(fn)
    except _NotBridged as e:
        _FAILED[fn.__code__] = str(e)
    except (OSError, TypeError, SyntaxError) as e:  # no source, a builtin: as written
        _FAILED[getattr(fn, "__code__", fn)] = f"{type(e).__name__}: {e}"
    return fn


class _NotBridged(Exception):
    pass


def every_index(mask: torch.Tensor, squeezed: bool = False, *bounds: Any):
    """The bridged ``mask.nonzero()``: every index of a 1-D mask, as the 1-tuples a loop over
    ``nonzero()`` rows reads with ``v[0]`` (as ints when the loop read ``nonzero().squeeze(-1)``
    rows with ``v.item()``); any other mask as ``nonzero`` gives it.

    ``bounds`` (a loop with no sentinel skip): the tensors and module lists its body indexes
    with the loop variable before any effect. Indices past the shortest are not run: in the
    original loop such an index, if hit, raises at that indexing before adding anything, so on
    every input the original runs without error both add the same. When none of them has a
    length, the loop is left as written (``nonzero``)."""
    if mask.dim() != 1:
        hit = mask.nonzero()
        return hit.squeeze(-1) if squeezed else hit
    n = mask.shape[0]
    if bounds:
        lengths = [
            b.shape[0] if isinstance(b, torch.Tensor) else len(b)
            for b in bounds
            if (isinstance(b, torch.Tensor) and b.dim() >= 1)
            or isinstance(b, (torch.nn.ModuleList, list, tuple))
        ]
        if not lengths:
            hit = mask.nonzero()
            return hit.squeeze(-1) if squeezed else hit
        n = min(n, *lengths)
    return list(range(n)) if squeezed else [(i,) for i in range(n)]


def _hit_call(value: ast.expr) -> tuple[ast.Call, bool] | None:
    """``<mask>.nonzero()`` (rows, read with ``v[0]``) or ``<mask>.nonzero().squeeze(-1)``
    (0-d tensors, read with ``v.item()``): the ``nonzero`` call and whether it is squeezed."""
    squeezed = False
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "squeeze"
        and len(value.args) == 1
        and not value.keywords
        and ast.unparse(value.args[0]) in ("-1", "1")
    ):
        value, squeezed = value.func.value, True
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "nonzero"
        and not value.args
        and not value.keywords
    ):
        return value, squeezed
    return None


def _bridge(fn: Callable) -> Callable:
    code = fn.__code__
    if code.co_freevars:
        raise _NotBridged("the forward is a closure")
    src = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(src)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise _NotBridged("not a plain function")
    fdef.decorator_list = []
    # H = <mask>.nonzero() (at top level or inside a `with`), H read only as a loop's iterable
    hits: dict[str, tuple[ast.Assign, ast.Call, bool]] = {}
    for node in ast.walk(fdef):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and (found := _hit_call(node.value)) is not None
        ):
            hits[node.targets[0].id] = (node, *found)
    loops = [
        (i, s)
        for i, s in enumerate(fdef.body)
        if isinstance(s, ast.For) and isinstance(s.iter, ast.Name) and s.iter.id in hits
    ]
    if len(loops) != 1:
        raise _NotBridged("no single top-level loop over a nonzero() result")
    pos, loop = loops[0]
    hit = loop.iter.id
    loads = [
        n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == hit and n is not loop.iter
    ]
    if any(isinstance(n.ctx, ast.Load) for n in loads) or len(loads) != 1:
        raise _NotBridged(f"{hit} is used other than as the loop's iterable")
    assign, call, squeezed = hits[hit]
    args = fdef.args.posonlyargs + fdef.args.args
    self_first = (
        bool(args)
        and args[0].arg == "self"
        and not any(
            isinstance(n, ast.Name) and n.id == "self" and not isinstance(n.ctx, ast.Load)
            for n in ast.walk(fdef)
        )
    )
    bounds = _loop_ok(loop, fdef.body[pos + 1 :], squeezed, self_first)
    _unhit_adds_nothing(fdef, loop, call, assign)
    assign.value = ast.Call(
        func=ast.Name("_capmoe_every_index", ast.Load()),
        args=[call.func.value, ast.Constant(squeezed), *bounds],
        keywords=[],
    )
    if squeezed:  # the loop runs over ints: `v = v.item()` goes
        loop.body = loop.body[1:]
    ast.fix_missing_locations(tree)
    # keep the source's line numbers: stack traces and explain point at the model's file
    ast.increment_lineno(tree, code.co_firstlineno - 1)
    compiled = compile(tree, code.co_filename, "exec")
    new_code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    # The bridged function lives in the model's own module namespace (Dynamo guards on the
    # globals it reads through that module), which gains this one prefixed name.
    glb = fn.__globals__
    glb["_capmoe_every_index"] = every_index
    new = types.FunctionType(new_code, glb, fn.__name__, fn.__defaults__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def _first_statement_ok(first: ast.stmt | None, v: str, squeezed: bool) -> bool:
    """``v = v[0]`` (rows of ``nonzero()``) or ``v = v.item()`` / ``int(v)`` (squeezed)."""
    if not (
        isinstance(first, ast.Assign)
        and len(first.targets) == 1
        and isinstance(first.targets[0], ast.Name)
        and first.targets[0].id == v
    ):
        return False
    src = ast.unparse(first.value)
    return src in (f"{v}.item()", f"int({v})") if squeezed else src == f"{v}[0]"


def _is_sentinel_skip(s: ast.If, v: str) -> bool:
    """``if v == <constant or attribute>: continue``."""
    return (
        isinstance(s.test, ast.Compare)
        and isinstance(s.test.left, ast.Name)
        and s.test.left.id == v
        and len(s.test.ops) == 1
        and isinstance(s.test.ops[0], ast.Eq)
        and bool(s.body)
        and all(isinstance(b, ast.Continue) for b in s.body)
        and not s.orelse
    )


def _empty_skip(s: ast.If) -> str | None:
    """``if X.numel() == 0: continue`` (also ``X.shape[0] == 0``, ``not X.numel()``): X."""
    if s.orelse or not s.body or not all(isinstance(b, ast.Continue) for b in s.body):
        return None
    src = ast.unparse(s.test)
    for pat in (r"(\w+)\.numel\(\) == 0", r"(\w+)\.shape\[0\] == 0", r"not (\w+)\.numel\(\)"):
        m = re.fullmatch(pat, src)
        if m:
            return m.group(1)
    return None


def _check_calls(s: ast.stmt) -> None:
    for n in ast.walk(s):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            name = n.func.attr
            if name in _FORBIDDEN_CALLS or (
                name.endswith("_") and not name.endswith("__") and name != "index_add_"
            ):
                raise _NotBridged(f"the loop body calls .{name}() (line {s.lineno})")
        if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Yield, ast.Await)):
            raise _NotBridged(f"the loop body has a {type(n).__name__} (line {s.lineno})")


def _loop_ok(
    loop: ast.For, after: list[ast.stmt], squeezed: bool, self_first: bool
) -> list[ast.expr]:
    """Raise unless running ``loop``'s body for an expert with no rows changes nothing.

    Drops the loop's empty-selection skips (``if rows.numel() == 0: continue``: data-dependent
    branches) where every ``index_add_`` adds over those rows, so an empty selection adds
    nothing either way. Returns the bounds :func:`every_index` takes: ``[]`` with a sentinel
    skip, else the ``self.<attr>[v]`` the body reads before its first ``index_add_``."""
    if not isinstance(loop.target, ast.Name) or loop.orelse:
        raise _NotBridged("the loop has a non-name target or an else clause")
    v = loop.target.id
    body = loop.body
    if not _first_statement_ok(body[0] if body else None, v, squeezed):
        want = f"{v} = {v}.item()" if squeezed else f"{v} = {v}[0]"
        raise _NotBridged(f"the loop body does not start with {want}")
    assigned: set[str] = {v}
    accumulators: set[str] = set()
    sentinel = False
    empty: list[tuple[ast.If, str]] = []
    added_over: set[str] = set()
    bounds: list[ast.expr] | None = None  # set at the first effect
    for s in body[1:]:
        if isinstance(s, ast.If):
            if _is_sentinel_skip(s, v):
                sentinel = True
            elif (rows := _empty_skip(s)) is not None:
                empty.append((s, rows))
                continue  # its test reads a size only: dropped below
            else:
                raise _NotBridged(f"the loop body branches (line {s.lineno})")
        elif isinstance(s, ast.Assign):
            for t in s.targets:
                names = t.elts if isinstance(t, ast.Tuple) else [t]
                if not all(isinstance(n, ast.Name) for n in names):
                    raise _NotBridged(f"the loop body writes into a tensor (line {s.lineno})")
                assigned.update(n.id for n in names)
        elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            f = s.value.func
            if not (
                isinstance(f, ast.Attribute)
                and f.attr == "index_add_"
                and isinstance(f.value, ast.Name)
                and len(s.value.args) >= 2
                and isinstance(s.value.args[1], ast.Name)
            ):
                raise _NotBridged(f"the loop body calls {ast.unparse(f)} for its effect")
            accumulators.add(f.value.id)
            added_over.add(s.value.args[1].id)
            if bounds is None:
                bounds = _indexed_by(body[1 : body.index(s) + 1], v)
        else:
            raise _NotBridged(f"the loop body has a {type(s).__name__} (line {s.lineno})")
        _check_calls(s)
    if accumulators & assigned:
        raise _NotBridged("the loop rebinds its accumulator")
    later = {n.id for s in after for n in ast.walk(s) if isinstance(n, ast.Name)}
    leaked = sorted(later & assigned)
    if leaked:
        raise _NotBridged(f"names set in the loop are read after it: {', '.join(leaked)}")
    if any(rows not in added_over or added_over != {rows} for _, rows in empty):
        raise _NotBridged("the loop skips an empty selection it does not add over")
    loop.body = [s for s in body if all(s is not e for e, _ in empty)]
    if sentinel:
        return []
    if not bounds or not self_first:
        # every index of the mask runs the body: the one past the last expert (one_hot over
        # E + 1 classes) would index the expert weights out of bounds without this skip or a
        # weight indexed by the loop variable that bounds the loop
        raise _NotBridged(
            f"the loop body has no `if {v} == <sentinel>: continue` and indexes no "
            f"self.<weights>[{v}] before it adds"
        )
    return bounds


def _indexed_by(stmts: list[ast.stmt], v: str) -> list[ast.expr]:
    """The ``self.<attr>[v]`` that ``stmts`` evaluate unconditionally (no ``if`` expression,
    ``and``/``or`` or comprehension around them), each once."""
    out: dict[str, ast.expr] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.IfExp, ast.BoolOp, ast.comprehension, ast.Lambda)):
            return
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Name)
            and node.slice.id == v
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            out.setdefault(ast.unparse(node.value), node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for s in stmts:
        if not isinstance(s, ast.If):  # skips evaluate only their test
            visit(s)
    return [ast.Attribute(ast.Name("self", ast.Load()), a.attr, ast.Load()) for a in out.values()]


def _mask_of_hit(test: ast.expr) -> str | None:
    """M when ``test`` is ``torch.greater(M.sum(dim=<negative dims>), 0)`` or
    ``M.sum(dim=<negative dims>) > 0``: the leading index of M whose slice has a nonzero."""
    if isinstance(test, ast.Call) and ast.unparse(test.func) == "torch.greater":
        if len(test.args) != 2 or test.keywords:
            return None
        total, zero = test.args
    elif isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Gt):
        total, zero = test.left, test.comparators[0]
    else:
        return None
    if not (isinstance(zero, ast.Constant) and zero.value == 0):
        return None
    if not (
        isinstance(total, ast.Call)
        and isinstance(total.func, ast.Attribute)
        and total.func.attr == "sum"
        and isinstance(total.func.value, ast.Name)
    ):
        return None
    dims = [*total.args, *(k.value for k in total.keywords if k.arg == "dim")]
    if len(dims) != 1 or len(total.args) + len(total.keywords) != 1:
        return None
    # negative dims only: a 1-D result (every_index checks it) then leaves exactly dim 0
    if not re.fullmatch(r"\(?-\d+(, -\d+)*,?\)?", ast.unparse(dims[0])):
        return None
    return total.func.value.id


def _check_one_hot(fdef: ast.FunctionDef, mask: str, hit: ast.Assign) -> None:
    """Raise unless every binding of ``mask`` is a ``one_hot`` (or a permutation or transpose
    of it) and nothing writes it in place: its entries are then 0 or 1."""
    a = fdef.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
    stores = [
        n
        for n in ast.walk(fdef)
        if isinstance(n, ast.Name) and n.id == mask and not isinstance(n.ctx, ast.Load)
    ]
    simple = [
        t
        for n in ast.walk(fdef)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id == mask
    ]
    if any(p is not None and p.arg == mask for p in params) or not simple:
        raise _NotBridged(f"the mask {mask} is not computed in the forward")
    if len(stores) != len(simple):
        raise _NotBridged(f"the mask {mask} is bound other than by a plain assignment")
    # the hit experts and the loop read the same mask: bound before the hit experts, once
    # they are computed at the top level (or in a top-level `with`), never again
    top = [*fdef.body, *(b for w in fdef.body if isinstance(w, ast.With) for b in w.body)]
    if not any(hit is t for t in top) or any(n.lineno >= hit.lineno for n in stores):
        raise _NotBridged(f"the mask {mask} is rebound after the experts hit are computed")
    for node in ast.walk(fdef):
        # nothing may change the mask in place: M += .., M[..] = .., M.<op>_(..)
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == mask
        ) or (
            isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete))
            and any(
                isinstance(t, ast.Subscript) and ast.unparse(t.value) == mask
                for t in getattr(node, "targets", [getattr(node, "target", None)])
            )
        ):
            raise _NotBridged(f"the mask {mask} is written in place (line {node.lineno})")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == mask
            and node.func.attr.endswith("_")
            and not node.func.attr.endswith("__")
        ):
            raise _NotBridged(f"the mask {mask} is changed in place by .{node.func.attr}()")
        if not (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == mask for t in node.targets)
        ):
            continue
        value = node.value
        while (  # one_hot(...).permute(...): the reorders of a one_hot
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in ("permute", "transpose")
            and isinstance(value.func.value, ast.Call)
            and all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in value.args)
            and not value.keywords
        ):
            value = value.func.value
        f = value.func if isinstance(value, ast.Call) else None
        one_hot = isinstance(f, (ast.Name, ast.Attribute)) and (
            getattr(f, "id", None) == "one_hot" or getattr(f, "attr", None) == "one_hot"
        )
        reorder = (
            isinstance(f, ast.Attribute)
            and f.attr in ("permute", "transpose")
            and isinstance(f.value, ast.Name)
            and f.value.id == mask
            and all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in value.args)
            and not value.keywords
        )
        if not (one_hot or reorder):
            raise _NotBridged(f"the mask {mask} is not a one_hot: {ast.unparse(value)}")


def _unhit_adds_nothing(
    fdef: ast.FunctionDef, loop: ast.For, call: ast.Call, hit: ast.Assign
) -> None:
    """Raise unless an expert the original loop skips (not hit) adds nothing when run.

    The hit experts are ``greater(M.sum(...), 0).nonzero()`` of a mask ``M`` that is a
    ``one_hot`` (permuted or transposed: no negative entries): not hit means ``M[v]`` is all
    zeros. Every ``index_add_`` adds over rows ``torch.where(M[v])`` gives: none for it."""
    mask = _mask_of_hit(call.func.value)
    if mask is None:
        raise _NotBridged(
            f"the experts hit are not the nonzero rows of a mask: {ast.unparse(call.func.value)}"
        )
    _check_one_hot(fdef, mask, hit)
    v = loop.target.id
    rows_of = set()
    for s in loop.body:
        if (
            isinstance(s, ast.Assign)
            and len(s.targets) == 1
            and isinstance(s.targets[0], ast.Tuple)
            and ast.unparse(s.value) == f"torch.where({mask}[{v}])"
        ):
            rows_of.update(n.id for n in s.targets[0].elts if isinstance(n, ast.Name))
    rebound = [
        n.id
        for s in loop.body
        for t in getattr(s, "targets", ())
        for n in ast.walk(t)
        if isinstance(n, ast.Name) and n.id in rows_of
    ]
    if len(rebound) != len(set(rebound)):
        raise _NotBridged(f"the loop rebinds the rows of torch.where({mask}[{v}])")
    for s in loop.body:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            rows = s.value.args[1]
            if not (isinstance(rows, ast.Name) and rows.id in rows_of):
                raise _NotBridged(
                    f"the loop adds over rows other than torch.where({mask}[{v}]) (line {s.lineno})"
                )
