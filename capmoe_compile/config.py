"""Global configuration of capmoe-compile, in the style of ``torch._inductor.config``.

Every knob is a module attribute. Assigning one validates it::

    from capmoe_compile import config
    config.capacity_factor = 1.0      # ValueError for 0, -1, nan, inf, "1"

and ``patch`` changes knobs temporarily, as a context manager or a decorator::

    with config.patch(capacity_factor=1.5, policy="order"):
        ...

    @config.patch({"policy": "random", "seed": 3})
    def run(): ...

Precedence, least to most specific: the defaults below < this module < ``options=`` given to
``torch.compile`` (see ``resolve``) < per-module overrides (``capmoe_compile.module_config``).
Where ``options=`` outranks a value set here, a warning names both (once per pair of values).
``version()`` increases on every change, so compiled layers resolve their options again on
their next call (no recompile), and the width guard of ``pipeline.guard_width`` checks again
whether a layer's routed width changed (``expanded_drop``: then, and only then, the frame
recompiles, once per width).

Knobs (SPEC.md has the exact semantics):

- ``capacity_factor``: gamma; ``C = max(min_capacity, ceil(gamma * T * k / E))``.
  ``None`` (default) leaves every MoE layer exactly as the model wrote it.
- ``policy``: which pairs survive when an expert overflows: ``"score"`` (the paper's Token
  Drop), ``"order"``, ``"reverse"``, ``"random"``, ``"expanded_drop"``, ``"reroute"``.
- ``local_experts``: experts local to every token for ``expanded_drop`` on one device
  (``None``: all experts, as the paper's code does).
- ``renormalize``: rescale each token's kept weights to its original weight sum.
- ``reroute_rounds``: proposal rounds of ``reroute`` (0 makes it ``score``).
- ``seed``: seed of the ``random`` policy.
- ``min_tokens``: calls with fewer tokens ``T`` run as written. Default 2: a single token can
  never overflow a drop policy (``C >= 1``), the paper's code switches capacity off for
  single-token decode, and ``expanded_drop`` would otherwise add experts to a decode token
  for no latency gain.
- ``min_capacity``: lower bound of ``C`` (DeepSpeed's ``min_capacity``).
- ``capacity_align``: ``C`` is rounded up to a multiple of this (Tutel's alignment).
- ``capacity_scope``: ``"batch"`` (one ``C`` per call, the paper's) or ``"sequence"``
  (one ``C`` per sequence: batch-invariant outputs).
- ``exclude_padding``: padding rows tied to the attention mask count in no load.
- ``batch_invariant``: expert GEMMs in fixed row tiles, so a row's result does not depend on
  how many rows share its expert (``lowering/invariant.py``). Always on under
  ``capacity_scope="sequence"``; set it for bit-identical outputs across batchings with
  capacity off or batch scope too (routing under batch scope still depends on the batch).
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .routing import POLICIES, SCOPES, policy_names  # noqa: F401 - config.POLICIES

capacity_factor: float | None = None
policy: str = "score"
local_experts: tuple[int, ...] | None = None
renormalize: bool = False
reroute_rounds: int = 1
seed: int = 0
min_tokens: int = 2
min_capacity: int = 1
capacity_align: int = 1
capacity_scope: str = "batch"
exclude_padding: bool = True
batch_invariant: bool = False

KNOBS: Mapping[str, Any] = types.MappingProxyType(
    {
        "capacity_factor": capacity_factor,
        "policy": policy,
        "local_experts": local_experts,
        "renormalize": renormalize,
        "reroute_rounds": reroute_rounds,
        "seed": seed,
        "min_tokens": min_tokens,
        "min_capacity": min_capacity,
        "capacity_align": capacity_align,
        "capacity_scope": capacity_scope,
        "exclude_padding": exclude_padding,
        "batch_invariant": batch_invariant,
    }
)

_version = 0
_F = TypeVar("_F", bound=Callable[..., Any])


def version() -> int:
    """A counter that increases whenever configuration (global or per-module) may have changed."""
    return _version


def _bump() -> None:
    global _version
    _version += 1


def _fail(name: str, expected: str, value: object, hint: str = "") -> ValueError:
    return ValueError(f"capmoe config option {name!r} must be {expected}; got {value!r}{hint}")


def _int(name: str, value: object, low: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _fail(name, expected, value)
    return int(value)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f". Did you mean {close[0]!r}?" if close and isinstance(value, str) else ""
        raise _fail(name, "one of " + ", ".join(map(repr, allowed)), value, hint)
    return str(value)


def _capacity_factor(value: object) -> float | None:
    if value is None:
        return None
    expected = "None (capacity off) or a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail("capacity_factor", expected, value)
    if not 0 < value < math.inf:  # also rejects NaN; traceable by Dynamo (no math.isfinite)
        raise _fail("capacity_factor", expected, value)
    return value if isinstance(value, float) else float(value)


def _local_experts(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    expected = "None (all experts) or a non-empty sequence of distinct non-negative ints"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail("local_experts", expected, value)
    items = list(value)
    if not items or len(set(items)) != len(items):
        raise _fail("local_experts", expected, value)
    return tuple(sorted(_int("local_experts", e, 0, expected) for e in items))


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "capacity_factor": _capacity_factor,
    "policy": lambda v: _choice("policy", v, policy_names()),
    "local_experts": _local_experts,
    "renormalize": lambda v: _bool("renormalize", v),
    "reroute_rounds": lambda v: _int("reroute_rounds", v, 0, "an int >= 0"),
    "seed": lambda v: _int("seed", v, 0, "an int >= 0"),
    "min_tokens": lambda v: _int("min_tokens", v, 0, "an int >= 0"),
    "min_capacity": lambda v: _int("min_capacity", v, 1, "an int >= 1"),
    "capacity_align": lambda v: _int("capacity_align", v, 1, "an int >= 1"),
    "capacity_scope": lambda v: _choice("capacity_scope", v, SCOPES),
    "exclude_padding": lambda v: _bool("exclude_padding", v),
    "batch_invariant": lambda v: _bool("batch_invariant", v),
}


def validate(name: str, value: object) -> Any:
    """Return ``value`` normalised for option ``name``; ``ValueError`` if it is not allowed."""
    if name not in _VALIDATORS:
        close = difflib.get_close_matches(str(name), KNOBS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown capmoe config option {name!r}.{hint} Known options: {', '.join(KNOBS)}"
        )
    return _VALIDATORS[name](value)


def _validate_all(options: Mapping[str, object]) -> dict[str, Any]:
    return {name: validate(name, value) for name, value in options.items()}


def snapshot() -> dict[str, Any]:
    """The current value of every knob."""
    this = sys.modules[__name__]
    return {name: getattr(this, name) for name in KNOBS}


def resolve(options: Mapping[str, object] | None = None) -> dict[str, Any]:
    """The current values overlaid with ``options`` (e.g. ``torch.compile(options=...)``)."""
    return {**snapshot(), **_validate_all(options or {})}


class _Patch:
    """Context manager and decorator returned by ``patch``."""

    def __init__(self, changes: dict[str, Any]) -> None:
        self._changes = changes
        self._saved: list[dict[str, Any]] = []

    def __enter__(self) -> _Patch:
        g = globals()
        self._saved.append({name: g[name] for name in self._changes})
        g.update(self._changes)
        _bump()
        return self

    def __exit__(self, *exc: object) -> None:
        globals().update(self._saved.pop())
        _bump()

    def __call__(self, fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _Patch(self._changes):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def patch(changes: Mapping[str, object] | None = None, /, **kwargs: object) -> _Patch:
    """Set knobs temporarily: ``with patch(policy="order"):`` or ``@patch({"seed": 1})``.

    Values are validated here, so a bad patch fails where it is written.
    """
    return _Patch(_validate_all({**(changes or {}), **kwargs}))


class _ConfigModule(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        if name in KNOBS:
            super().__setattr__(name, validate(name, value))
            _bump()
        elif name.startswith("_") or name in self.__dict__:
            super().__setattr__(name, value)
        else:
            validate(name, value)  # raises: unknown option, with a suggestion

    def __delattr__(self, name: str) -> None:
        if name in KNOBS:
            raise AttributeError(f"capmoe config option {name!r} cannot be deleted")
        super().__delattr__(name)


sys.modules[__name__].__class__ = _ConfigModule
