"""The ``capmoe`` backend: entry point, option validation, configuration changes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from capmoe_compile import backend, config, module_config


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    before = config.snapshot()
    yield
    for name, value in before.items():
        setattr(config, name, value)
    module_config.clear()
    torch._dynamo.reset()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_backend_name_works_without_importing_package():
    proc = _run(
        """
        import sys
        import torch
        assert "capmoe_compile" not in sys.modules
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4)
        out = torch.compile(m, backend="capmoe")(x)
        torch.testing.assert_close(out, m(x))
        assert "capmoe_compile.backend" in sys.modules
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK"


def test_bad_options_fail_on_first_call():
    compiled = torch.compile(
        torch.nn.Linear(4, 4), backend="capmoe", options={"capacity_factor": -1}
    )
    with pytest.raises(Exception, match="capacity_factor"):
        compiled(torch.randn(2, 4))
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="capmoe", options={"polcy": "x"})
    with pytest.raises(Exception, match="Did you mean 'policy'"):
        compiled(torch.randn(2, 4))


def test_config_change_needs_no_recompile():
    # The backend compiles once; rewritten layers resolve options when they run (ops.py), so
    # configuration changes take effect on the next call without a recompile.
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    f = torch.compile(m, backend="capmoe", options={"seed": 1})
    n = backend.compile_count()
    torch.testing.assert_close(f(x), m(x))
    assert backend.compile_count() == n + 1
    config.capacity_factor = 1.0
    torch.testing.assert_close(f(x), m(x))
    with config.patch(policy="order"):
        torch.testing.assert_close(f(x), m(x))
    module_config.configure(m[0], capacity_factor=2.0)
    torch.testing.assert_close(f(x), m(x))
    assert backend.compile_count() == n + 1


def test_backend_called_directly():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    x = torch.randn(2, 4)
    compiled = backend.capmoe_backend(torch.fx.symbolic_trace(m), [x], options={"seed": 1})
    torch.testing.assert_close(compiled(x), m(x))
    with pytest.raises(ValueError, match="min_capacity"):
        backend.capmoe_backend(torch.fx.symbolic_trace(m), [x], options={"min_capacity": 0})


def test_mode_is_passed_to_inductor():
    m = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(m, backend="capmoe", mode="reduce-overhead")(x), m(x))


def test_package_namespace_is_its_api_and_its_modules():
    """``dir(capmoe_compile)`` lists the public API (``__all__``), the package's own modules
    and private names: no helper imports (``torch``, ``Sequence``, ``annotations``)."""
    import types

    import capmoe_compile

    public = {n for n in dir(capmoe_compile) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(capmoe_compile, n), types.ModuleType)} - set(
        capmoe_compile.__all__
    )
    stray = {
        n for n in modules if not getattr(capmoe_compile, n).__name__.startswith("capmoe_compile.")
    }
    assert not stray, stray
    assert public - modules == set(capmoe_compile.__all__), public - modules
