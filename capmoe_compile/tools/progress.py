"""A status line for the long steps of the ``capmoe`` commands (no dependency).

On a terminal, :class:`Progress` keeps one line on stderr, rewritten in place about once a
second: what is running now and the seconds since the command started::

    capmoe calibrate [  23 s] model.layers.1.mlp score gamma=1.25 (pass 7)

Where stderr is not a terminal (a pipe, a file, a CI log) or under ``--quiet`` it writes
nothing, so captured output holds the results only. Results go to stdout through
:meth:`Progress.echo`, which clears the status line first so the two never mix.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]


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
        self._draw()

    def echo(self, *args: object, **kwargs: object) -> None:
        """``print`` to stdout (results), with the status line cleared first."""
        with self._lock:
            self._clear_locked()
            print(*args, **kwargs, flush=True)  # type: ignore[call-overload]

    def line(self) -> str:
        """The status line as it would be drawn now."""
        return f"capmoe {self.label} [{time.perf_counter() - self.t0:4.0f} s] {self.text}"

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
