"""Every benchmark record names the ISA it was measured on (issue 26).

``benchmarks.common.isa()`` gives the CPU capability ATen dispatches, the CPU model, whether AMX
and AVX-512 bf16 are present, threads and load; ``write_json`` and ``with_isa`` add it to a
payload, and every benchmark script that writes JSON goes through one of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from benchmarks import common

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_isa_fields():
    i = common.isa()
    assert i["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for key in ("cpu_model", "amx", "avx512_bf16", "avx512", "flags", "torch_threads", "loadavg"):
        assert key in i, key
    assert isinstance(i["amx"], bool) and isinstance(i["avx512_bf16"], bool)
    assert i["torch_threads"] == torch.get_num_threads()
    assert set(i["flags"]) <= set(common.ISA_FLAGS)
    assert i["cpu_capability"] in common.isa_line(i)


def test_write_json_adds_isa(tmp_path):
    p = tmp_path / "r.json"
    common.write_json(str(p), {"rows": [1]})
    got = json.loads(p.read_text())
    assert got["rows"] == [1] and got["isa"]["cpu_capability"]
    kept = common.with_isa({"isa": {"cpu_capability": "X"}})
    assert kept["isa"] == {"cpu_capability": "X"}  # taken at the start of a run: kept
    assert "isa" in common.machine()


def test_every_json_writing_benchmark_names_the_isa():
    """A script that dumps JSON itself (not through ``common.write_json``) wraps its payload in
    ``with_isa`` or adds ``isa()``."""
    missing = []
    for path in sorted(BENCH.glob("*.py")):
        src = path.read_text()
        writes = re.search(r"json\.dump\(|write_text\(\s*json\.dumps|write_json\(", src)
        if path.name == "common.py" or not writes:
            continue
        if not re.search(r"with_isa\(|isa\(\)|write_json\(|machine\(\)", src):
            missing.append(path.name)
    assert not missing, f"benchmark JSON without the ISA: {missing}"
