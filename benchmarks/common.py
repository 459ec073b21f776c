"""Helpers shared by the benchmarks: machine description, interleaved timing, roofline floors,
tables and the recorded JSON.

Timing rule (the machines are shared and noisy): every row of one comparison is measured in the
same run, interleaved round-robin (each repetition calls every row once, starting from a
rotating offset), and the median of the repetitions is reported. The GEMM peak and the memory
bandwidth that the floors use are rows of the same loop, so they see the same noise.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the numbers were measured on (with :func:`isa` under ``"isa"``)."""
    cpu = machine_cpu_name()
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "isa": isa(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


#: ``/proc/cpuinfo`` flags that decide which CPU kernels run (and so how a figure reads).
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_cpu_check(name: str) -> bool | None:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:
        return None


def isa() -> dict[str, Any]:
    """The instruction set a CPU figure was measured with (issue 26: targets are read per
    ISA): ``torch.backends.cpu.get_cpu_capability()`` (what ATen dispatches: "AVX2",
    "AVX512", ...), the CPU model (``lscpu``), whether AMX and AVX-512 bf16 are present
    (``/proc/cpuinfo`` and torch's own checks, which also need the OS to enable the tiles),
    the ``/proc/cpuinfo`` flags of :data:`ISA_FLAGS`, torch's intra-op threads, the cores and
    the load average now. Every benchmark JSON carries it under ``"isa"``."""
    flags = _cpuinfo_flags()
    amx_torch = _torch_cpu_check("_is_amx_tile_supported")
    bf16_torch = _torch_cpu_check("_is_avx512_bf16_supported")
    info: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _lscpu_model() or machine_cpu_name(),
        "machine": platform.machine(),
        "amx": bool(amx_torch) if amx_torch is not None else "amx_tile" in flags,
        "avx512_bf16": bool(bf16_torch) if bf16_torch is not None else "avx512_bf16" in flags,
        "avx512": "avx512f" in flags,
        "flags": sorted(f for f in ISA_FLAGS if f in flags),
        "torch_amx_tile": amx_torch,
        "torch_avx512_bf16": bf16_torch,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cores": os.cpu_count(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "torch": torch.__version__,
    }
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        info["loadavg"] = None
    return info


def isa_line(info: Mapping[str, Any] | None = None) -> str:
    """One line of :func:`isa` for a benchmark's printed header."""
    i = dict(info or isa())
    amx = "AMX" if i["amx"] else "no AMX"
    bf16 = "avx512_bf16" if i["avx512_bf16"] else "no avx512_bf16"
    load = i.get("loadavg")
    load_s = "?" if load is None else "/".join(f"{v:.1f}" for v in load)
    return (
        f"# ISA {i['cpu_capability']} ({i['cpu_model']}; {amx}, {bf16}), "
        f"{i['torch_threads']} thread(s) of {i['cores']} cores, load {load_s}"
    )


def machine_cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def loadavg_end(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` (from :func:`machine`) with the load average at the end of the run added."""
    with contextlib.suppress(OSError):
        info["loadavg_end"] = os.getloadavg()
    return info


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    rows: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every row, ``reps`` samples each, round-robin over the rows.

    ``clock``: ``time.perf_counter`` (wall) or ``time.thread_time`` (the calling thread's CPU
    time: with one intra-op thread all of a CPU row's work, and a shared machine's
    descheduled time is not counted)."""
    names = list(rows)
    for _ in range(warmup):
        for n in names:
            rows[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            sync(device)
            t0 = clock()
            rows[n]()
            sync(device)
            times[n].append(clock() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def gemm_peak_row(n: int, dtype: torch.dtype, device="cpu") -> tuple[Callable[[], Any], float]:
    """A large square ``torch.mm`` and its FLOPs (2 n^3): the machine's measured GEMM peak."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def copy_bw_row(nbytes: int, device="cpu") -> tuple[Callable[[], Any], float]:
    """A large contiguous copy and the bytes it moves (read + write): memory bandwidth."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2.0 * n * 4


@dataclass
class Floor:
    """Roofline floor of one row: its FLOPs at the measured peak, its bytes at the measured
    bandwidth; the floor is the larger of the two."""

    flops: float
    bytes: float
    peak_flops: float  # FLOP/s
    bandwidth: float  # B/s
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops_s(self) -> float:
        return self.flops / self.peak_flops

    @property
    def bytes_s(self) -> float:
        return self.bytes / self.bandwidth

    @property
    def floor_s(self) -> float:
        return max(self.flops_s, self.bytes_s)


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in cells:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def _fmt(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.2f}"
    return str(c)


def with_isa(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` with :func:`isa` under ``"isa"`` (kept if it already has one, e.g. taken at
    the start of the run)."""
    out = dict(payload)
    if "isa" not in out:
        out["isa"] = isa()
    return out


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """``payload`` as JSON at ``path``, with the ISA record (:func:`with_isa`) added."""
    payload = with_isa(payload)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(o)}")


def json_line(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, default=_json_default, separators=(",", ":"))
