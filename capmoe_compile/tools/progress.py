"""A status line for the long steps of the ``capmoe`` commands (no dependency).

On a terminal, :class:`Progress` keeps one line on stderr, rewritten in place about once a
second: what is running now and the seconds since the command started::

    capmoe calibrate [  23 s] model.layers.1.mlp score gamma=1.25 (pass 7)

Where stderr is not a terminal (a pipe, a file, a CI log) or under ``--quiet`` it writes
nothing, so captured output holds the results only. Results go to stdout through
:meth:`Progress.echo`, which clears the status line first so the two never mix.

Inside :meth:`Progress.follow` the line also shows what a capmoe compile is doing (the library
logs it at INFO level to ``logging.getLogger("capmoe_compile.progress")`` and writes nothing
itself): the layer being verified and Inductor's compile of each graph::

    capmoe demo [  41 s] compile, then the capacity-off run: verifying model.layers.2.mlp (3 of 4)

In Python, :func:`compile_progress` gives the same line around any code that compiles::

    with compile_progress():
        model.generate(**batch, max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["COMPILE_LOGGER", "Progress", "compile_progress"]

#: the logger the capmoe passes and backend report their steps to (INFO records)
COMPILE_LOGGER = "capmoe_compile.progress"


class Progress:
    """``with Progress("calibrate") as p: p.phase("baseline pass"); ...``.

    ``enabled``: ``None`` (default) shows the line only where ``stream`` is a terminal;
    ``False`` (``--quiet``) never. ``interval``: seconds between redraws."""

    def __init__(
        self,
        label: str,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        interval: float = 1.0,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.interval = interval
        self.text = ""
        self.detail = ""  # what a followed compile is doing, shown after ``text``
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def __enter__(self) -> Progress:
        self.t0 = time.perf_counter()
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="capmoe-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._clear()

    def phase(self, text: str) -> None:
        """What runs now; shown at once and kept, with the clock running, until the next."""
        self.text = text
        self.detail = ""
        self._draw()

    def echo(self, *args: object, **kwargs: object) -> None:
        """``print`` to stdout (results), with the status line cleared first."""
        with self._lock:
            self._clear_locked()
            print(*args, **kwargs, flush=True)  # type: ignore[call-overload]

    def line(self) -> str:
        """The status line as it would be drawn now."""
        text = (
            f"{self.text}: {self.detail}" if self.text and self.detail else self.text or self.detail
        )
        return f"capmoe {self.label} [{time.perf_counter() - self.t0:4.0f} s] {text}"

    @contextlib.contextmanager
    def follow(self, logger: str = COMPILE_LOGGER) -> Iterator[Progress]:
        """Show ``logger``'s INFO records (what a capmoe compile is doing) after the current
        phase while the block runs. Does nothing where the line is off (not a terminal,
        ``--quiet``): the logger's level is not touched then."""
        if not self.enabled:
            yield self
            return
        log = logging.getLogger(logger)
        handler = _DetailHandler(self)
        level = log.level
        log.addHandler(handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        try:
            yield self
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
            self.detail = ""

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        if not self.enabled or self._stop.is_set():
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        with self._lock:
            self.stream.write("\r\x1b[K" + self.line()[:width])
            self.stream.flush()
            self._shown = True

    def _clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class _DetailHandler(logging.Handler):
    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.detail = record.getMessage()
        except Exception:  # noqa: BLE001 - a status line never breaks the work it reports
            return
        self.progress._draw()


@contextlib.contextmanager
def compile_progress(
    label: str = "compile", *, enabled: bool | None = None, stream: TextIO | None = None
) -> Iterator[Progress]:
    """A status line on stderr, where it is a terminal, with the seconds since the block began
    and what the capmoe compiles inside it are doing (the layer being verified, Inductor's
    compile). Nothing where stderr is not a terminal or ``enabled=False``."""
    with Progress(label, enabled=enabled, stream=stream) as p, p.follow():
        yield p
