"""The package's import structure, read from its source (every import, function-level included).

- No import cycles between the package's modules.
- The passes (find and verify layers) import neither the lowerings nor distributed: they hand
  a layer description to ``pipeline``, where the lowerings register.
- The library never imports the test models (``capmoe_compile.testing``) or the tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import capmoe_compile

ROOT = Path(capmoe_compile.__file__).parent
PKG = "capmoe_compile"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from .. import x`` names module ``x`` when
    there is one)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith(PKG) and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_the_import_reader_sees_known_edges():
    g = _graph()
    assert "capmoe_compile.pipeline" in g["capmoe_compile.passes.moe_layers"]
    assert "capmoe_compile.distributed.group" in g["capmoe_compile.distributed.ep"]
    assert "capmoe_compile.explain" in g["capmoe_compile.distributed.ep"]  # a lazy import


def test_no_import_cycles():
    # The root package only re-exports (and imports the lowerings so that they register);
    # a submodule reaching the root is reaching an alias of another submodule.
    g = {n: {m for m in deps if m != PKG} for n, deps in _graph().items() if n != PKG}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def _library(g):
    skip = (f"{PKG}.testing", f"{PKG}.tools")
    return {n: deps for n, deps in g.items() if not n.startswith(skip)}


def test_passes_import_neither_lowerings_nor_distributed():
    g = _graph()
    banned = (f"{PKG}.lowering", f"{PKG}.distributed", f"{PKG}.ops")
    for n, deps in g.items():
        if n.startswith(f"{PKG}.passes"):
            bad = sorted(d for d in deps if d.startswith(banned))
            assert not bad, f"{n} imports {bad}"


def test_library_imports_neither_test_models_nor_tools():
    for n, deps in _library(_graph()).items():
        bad = sorted(d for d in deps if d.startswith((f"{PKG}.testing", f"{PKG}.tools")))
        assert not bad, f"{n} imports {bad}"


#: Functions allowed past the limit, each with its reason.
LONG_FUNCTIONS = {
    # a Triton kernel is one GPU program: splitting it into helpers changes what it compiles to
    "capmoe_compile.lowering.triton_moe._gate_up_kernel",
}


def test_no_library_function_over_80_lines():
    """Every library function fits in 80 lines of code (its docstring not counted)."""
    long = []
    for name, path in _modules().items():
        if name.startswith((f"{PKG}.testing", f"{PKG}.tools")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node, clean=False) is not None:
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            if lines > 80 and f"{name}.{node.name}" not in LONG_FUNCTIONS:
                long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
