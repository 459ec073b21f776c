"""The loop bridge's second shape (:mod:`capmoe_compile.bridge_loop` has the first): an
experts forward that loops over the values its selection holds,

    for v in ids.unique():
        if v < self.num_experts:
            mask = ids == v
            ...                      # rows h[mask], weights self.<w>[v]
            out[mask] = ...          # each row written once: the masks are disjoint

(transformers' Ergo experts), rewritten into a loop over every expert index an input the
original runs on without error can hold. The body indexes ``self.<w>[v]`` for some ``[n, ...]``
weights before it writes, so any value it runs outside ``[-n, n)`` raises in the original;
a value in that range that ``ids`` does not hold selects no row, and its body writes nothing.
So the original and the loop over ``range(-n, min(n, bound))`` write the same rows with the
same values. Selections that are not integer tensors run ``ids.unique()`` as written
(:func:`every_value`)."""

from __future__ import annotations

import ast
from typing import Any

import torch


class NotBridged(Exception):
    pass


def every_value(ids: torch.Tensor, bound: Any, *weights: Any):
    """The bridged ``ids.unique()``: every integer ``v`` with ``-n <= v < min(n, bound)``
    (``n``: the shortest of ``weights``), or ``ids.unique()`` itself where that cannot be
    decided from static facts (a float selection, a bound that is not an int, no weight with a
    length)."""
    lengths = [
        w.shape[0] if isinstance(w, torch.Tensor) else len(w)
        for w in weights
        if (isinstance(w, torch.Tensor) and w.dim() >= 1)
        or isinstance(w, (torch.nn.ModuleList, list, tuple))
    ]
    integer = not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool
    if not lengths or not integer or type(bound) is not int:
        return ids.unique()
    n = min(lengths)
    return list(range(-n, min(n, bound)))


def _unique_loop(fdef: ast.FunctionDef) -> tuple[int, ast.For, str] | None:
    """The one top-level ``for v in X.unique():`` loop: (position, loop, X)."""
    found = [
        (i, s, s.iter.func.value.id)
        for i, s in enumerate(fdef.body)
        if isinstance(s, ast.For)
        and isinstance(s.iter, ast.Call)
        and isinstance(s.iter.func, ast.Attribute)
        and s.iter.func.attr == "unique"
        and isinstance(s.iter.func.value, ast.Name)
        and not s.iter.args
        and not s.iter.keywords
    ]
    return found[0] if len(found) == 1 else None


def _is_mask_of(value: ast.expr, sel: str, v: str) -> bool:
    """``sel == v`` or ``v == sel``."""
    if not (isinstance(value, ast.Compare) and len(value.ops) == 1):
        return False
    if not isinstance(value.ops[0], ast.Eq):
        return False
    names = [value.left, value.comparators[0]]
    return all(isinstance(n, ast.Name) for n in names) and {n.id for n in names} == {sel, v}


def rewrite(fdef: ast.FunctionDef, self_first: bool, indexed_by, check_calls) -> bool:
    """Rewrite ``fdef``'s unique-values loop in place; False when it has none. Raises
    :class:`NotBridged` with the reason when the loop is there but not provably the same.
    ``indexed_by`` and ``check_calls``: the first shape's checks (bridge_loop.py)."""
    found = _unique_loop(fdef)
    if found is None:
        return False
    pos, loop, sel = found
    if not isinstance(loop.target, ast.Name) or loop.orelse:
        raise NotBridged("the unique-values loop has a non-name target or an else clause")
    v = loop.target.id
    guard = loop.body[0] if len(loop.body) == 1 else None
    if not (
        isinstance(guard, ast.If)
        and not guard.orelse
        and isinstance(guard.test, ast.Compare)
        and len(guard.test.ops) == 1
        and isinstance(guard.test.ops[0], ast.Lt)
        and isinstance(guard.test.left, ast.Name)
        and guard.test.left.id == v
    ):
        raise NotBridged(f"the unique-values loop body is not one `if {v} < <bound>:`")
    bound = guard.test.comparators[0]
    masks: set[str] = set()
    assigned: set[str] = {v}
    first_write = None
    for i, s in enumerate(guard.body):
        check_calls(s)
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and _is_mask_of(s.value, sel, v):
            if not isinstance(s.targets[0], ast.Name):
                raise NotBridged(f"the mask {ast.unparse(s.value)} is not bound to a name")
            masks.add(s.targets[0].id)
        if isinstance(s, ast.Assign) and all(
            isinstance(n, ast.Name)
            for t in s.targets
            for n in (t.elts if isinstance(t, ast.Tuple) else [t])
        ):
            assigned.update(
                n.id for t in s.targets for n in (t.elts if isinstance(t, ast.Tuple) else [t])
            )
            continue
        t = s.targets[0] if isinstance(s, ast.Assign) and len(s.targets) == 1 else None
        if not (
            isinstance(t, ast.Subscript)
            and isinstance(t.value, ast.Name)
            and isinstance(t.slice, ast.Name)
            and t.slice.id in masks
        ):
            raise NotBridged(
                f"the unique-values loop has a statement other than name bindings and "
                f"`out[mask] = ...` writes (line {s.lineno})"
            )
        if t.value.id in assigned or t.value.id == sel:
            raise NotBridged(f"the loop writes into {t.value.id}, which it binds or selects by")
        first_write = i if first_write is None else first_write
    if first_write is None:
        raise NotBridged("the unique-values loop writes nothing")
    rebound = [
        n.id
        for s in guard.body
        for t in getattr(s, "targets", ())
        for n in ast.walk(t)
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load) and n.id in masks | {sel}
    ]
    if len(rebound) != len(set(rebound)) or sel in rebound:
        raise NotBridged("the loop rebinds its selection or a mask")
    for n in ast.walk(loop):  # v: the guard, the masks, self.<w>[v]; nothing else
        if isinstance(n, ast.Name) and n.id == v and isinstance(n.ctx, ast.Load):
            if not _allowed_use(loop, n, sel):
                raise NotBridged(f"{v} is used other than in the guard, masks and self.<w>[{v}]")
    later = {n.id for s in fdef.body[pos + 1 :] for n in ast.walk(s) if isinstance(n, ast.Name)}
    leaked = sorted(later & assigned)
    if leaked:
        raise NotBridged(f"names set in the loop are read after it: {', '.join(leaked)}")
    weights = indexed_by(guard.body[: first_write + 1], v)
    if not weights or not self_first:
        raise NotBridged(f"the loop indexes no self.<weights>[{v}] before it writes")
    loop.iter = ast.Call(
        func=ast.Name("_capmoe_every_value", ast.Load()),
        args=[ast.Name(sel, ast.Load()), bound, *weights],
        keywords=[],
    )
    return True


def _allowed_use(loop: ast.For, name: ast.Name, sel: str) -> bool:
    for parent in ast.walk(loop):
        for child in ast.iter_child_nodes(parent):
            if child is not name:
                continue
            if isinstance(parent, ast.Compare):
                return True  # the guard (v < bound) or a mask (sel == v)
            return (
                isinstance(parent, ast.Subscript)
                and parent.slice is name
                and isinstance(parent.value, ast.Attribute)
                and isinstance(parent.value.value, ast.Name)
                and parent.value.value.id == "self"
            )
    return False
