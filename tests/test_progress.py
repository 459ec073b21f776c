"""Progress of long work (issue 25): what a capmoe compile is doing, shown on a terminal only.

The passes and the backend log their steps at INFO level to ``capmoe_compile.progress`` and
print nothing; ``capmoe_compile.tools.progress`` shows them after the current phase of the
status line, where stderr is a terminal and ``--quiet`` is not given. Calibrate's held-out
evaluation reports each batch.
"""

from __future__ import annotations

import io
import logging

import torch

from capmoe_compile.tools.progress import COMPILE_LOGGER, Progress, compile_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_follow_shows_the_compile_step_after_the_phase():
    tty = _Terminal()
    log = logging.getLogger(COMPILE_LOGGER)
    level = log.level
    with Progress("demo", stream=tty, interval=60) as p, p.follow():
        p.phase("compile")
        assert log.isEnabledFor(logging.INFO)
        log.info("verifying %s (%d of %d)", "model.layers.2.mlp", 3, 4)
        assert p.line().endswith("compile: verifying model.layers.2.mlp (3 of 4)")
        p.phase("next")  # a new phase drops the compile's last step
        assert p.line().endswith("] next")
    assert "compile: verifying model.layers.2.mlp (3 of 4)" in tty.getvalue()
    assert log.level == level and not log.handlers  # left as found


def test_follow_off_the_terminal_touches_nothing():
    plain = io.StringIO()
    log = logging.getLogger(COMPILE_LOGGER)
    with Progress("demo", stream=plain) as p, p.follow():
        assert not log.handlers and not log.isEnabledFor(logging.INFO)
        log.info("verifying x (1 of 1)")
    with Progress("demo", stream=_Terminal(), enabled=False) as p, p.follow():  # --quiet
        assert not log.handlers
    assert plain.getvalue() == ""


def test_a_compile_reports_the_layer_it_verifies():
    """One plain MoE layer through the capmoe passes (``explain`` of a plain model: no
    Inductor, so the test stays cheap) names the layer and its place while it verifies it."""
    import capmoe_compile
    from capmoe_compile.testing import zoo

    model = zoo.skew_router_(zoo.plain_moe("stacked_bmm"))  # as tests/test_zoo_compile.py
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    tty = _Terminal()
    with compile_progress("explain", stream=tty) as p:
        p.phase("tracing")
        report = capmoe_compile.explain(model, capacity_factor=1.0)(x)
    assert "MoE layer(s) matched in 1 graph(s)" in str(report)
    assert "tracing: verifying" in tty.getvalue() and "(1 of 1)" in tty.getvalue()
    quiet = io.StringIO()  # not a terminal: the same work, nothing written
    with compile_progress("explain", stream=quiet):
        capmoe_compile.explain(model, capacity_factor=1.0)(x)
    assert quiet.getvalue() == ""


def test_calibration_evaluate_reports_each_batch():
    from capmoe_compile.calibrate import _ticker

    got: list[str] = []
    tick = _ticker(got.append, "capacity off")
    for i in range(1, 3):
        tick(i, 2)
    assert got == ["capacity off: batch 1 of 2", "capacity off: batch 2 of 2"]
    assert _ticker(None, "x") is None
