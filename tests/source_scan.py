"""The package's own source, read for the tests that keep each registry's names inside it
(``tests/test_registries.py``, ``tests/test_forms.py``)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import capmoe_compile

ROOT = Path(capmoe_compile.__file__).parent


def compares_against(names: set[str], skip: Iterable[str] = ()) -> list[str]:
    """Every comparison (``==``, ``!=``, ``in``) with one of ``names`` as a constant, in the
    package's modules outside ``skip`` (top-level folders, or module paths relative to the
    package), as ``path:line compares against 'name'``."""
    skip = set(skip)
    out = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in skip or str(rel) in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for c in ast.walk(node):
                    if isinstance(c, ast.Constant) and c.value in names:
                        out.append(f"{rel}:{node.lineno} compares against {c.value!r}")
    return out
