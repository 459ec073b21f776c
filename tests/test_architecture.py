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


# --------------------------------------------------------------------------------------------
# issue 24: module size, and no branching on registered names outside their registries
# --------------------------------------------------------------------------------------------

MAX_MODULE_LINES = 600


def test_no_module_over_600_lines():
    """Every module of the package (the test models and tools included) is at most 600 lines:
    a module past that holds more than one concern and is split by concern."""
    long = {}
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long[name] = lines
    assert not long, "modules over 600 lines: " + ", ".join(
        f"{n} ({k} lines)" for n, k in sorted(long.items(), key=lambda kv: -kv[1])
    )


def _registered_names() -> tuple[dict[str, str], set[str]]:
    """Every registered policy, kernel and expert-form name (name -> which axis), and the
    modules allowed to branch on them: each registry's own module and the modules that
    define its members. Read from the registries at test time, so that a new member (or a
    registry that moved) is covered without editing this test."""
    import importlib

    from capmoe_compile import routing
    from capmoe_compile.lowering import kernels

    names: dict[str, str] = {}
    allowed = {routing.register_policy.__module__, kernels.register_kernel.__module__}
    for n in routing.policy_names():
        names[n] = "policy"
        p = routing.get_policy(n)
        allowed |= {f.__module__ for f in (p.pair_key, p.candidates) if f is not None}
    for k in kernels.kernels():
        names[k.name] = "kernel"
        allowed |= {k.supports.__module__, k.run.__module__}
    try:  # the form registry (issue 24): form families and activations
        forms = importlib.import_module(f"{PKG}.forms")
        families, registers = forms.families(), (forms.register_form, forms.register_activation)
    except ModuleNotFoundError:  # before it: the activations of experts.ExpertForm
        forms = importlib.import_module(f"{PKG}.experts")
        families, registers = (), ()
    for f in families:
        names[f.name] = "expert form"
        allowed.add(type(f).__module__)
    for a in forms.ACTIVATIONS:
        names[a] = "activation (expert form)"
    allowed |= {forms.__name__, *(r.__module__ for r in registers)}
    return names, {a for a in allowed if a.startswith(PKG)}


def _name_branches(tree: ast.AST, names: dict[str, str]) -> list[tuple[int, str]]:
    """``(line, what)`` for each ``if`` / ``elif`` (and ``while``, conditional expression or
    comprehension condition) whose test compares a value against a registered name: a string
    constant, a tuple of them (``x in ("a", "b")``), or a module-level constant holding one."""
    consts = {}  # module-level NAME = "name" (or A, B = "a", "b")
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                for n, v in pairs:
                    if isinstance(n, ast.Name) and isinstance(v, ast.Constant) and v.value in names:
                        consts[n.id] = v.value

    def values(e: ast.expr):
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            yield e.value
        elif isinstance(e, (ast.Tuple, ast.List, ast.Set)):
            for x in e.elts:
                yield from values(x)
        elif isinstance(e, ast.Name) and e.id in consts:
            yield consts[e.id]

    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = node.ifs
        else:
            continue
        for test in tests:
            for cmp in ast.walk(test):
                if not isinstance(cmp, ast.Compare):
                    continue
                for operand in (cmp.left, *cmp.comparators):
                    out += [
                        (cmp.lineno, f"{names[v]} {v!r}") for v in values(operand) if v in names
                    ]
    return out


def test_the_name_branch_reader_fails_on_a_chain():
    names = {"score": "policy", "order": "policy", "reference": "kernel", "silu": "activation"}
    src = """
OTHER, REF = "x", "reference"
def pick(policy, kernel, act):
    if policy == "score":
        return 1
    elif policy in ("order", "other"):
        return 2
    y = 3 if kernel == REF else 4
    return [a for a in act if a != "silu"], y
def fine(policy):
    if policy.width is None and policy.name != "unregistered":
        return get(policy)
"""
    found = _name_branches(ast.parse(src), names)
    assert found == [
        (4, "policy 'score'"),
        (6, "policy 'order'"),
        (8, "kernel 'reference'"),
        (9, "activation 'silu'"),
    ], found


def test_no_if_chain_over_registered_names():
    """Outside the registries (``routing.register_policy``'s, ``kernels.register_kernel``'s,
    the form registry's) and the modules defining their members, no library code branches on
    a registered policy, kernel or expert-form name: a property of the member, read through
    its registry (``routing.widens(policy)``, ``kernel.supports(query)``, the form family's
    methods) is what says how it differs, so that a new member is one file plus its test.
    The test models (``capmoe_compile.testing``: independent spellings of what the library is
    tested against) and the tools (presentation of results) are not the library."""
    names, registries = _registered_names()
    assert {"policy", "kernel"} <= set(names.values()), names  # the reader sees the registries
    hits = []
    for name, path in _library(_modules()).items():
        if name in registries:
            continue
        for line, what in _name_branches(ast.parse(path.read_text()), names):
            hits.append(f"{path.relative_to(ROOT.parent)}:{line}: branches on {what}")
    assert not hits, "\n".join(hits)
