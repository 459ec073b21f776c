"""Expert parallelism with redundant copies (``expert_parallel(..., placement=...)``): 2 gloo
ranks on loopback started by ``torchrun``, against the single-device oracle of SPEC.md's
"Redundant expert copies" (``tests/ep_replicas_worker.py``). The torchrun process gets a
bounded time and is killed past it; every case reports per rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "ep_replicas_worker.py")
CASES = ("dup_on_rank", "uneven_slots_and_tokens", "shares", "sequence_scope", "plan_json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_replicas")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), WORKER, str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {e.timeout} s")
    got = []
    for r in range(2):
        path = out / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no results (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        got.append(json.loads(path.read_text()))
    return got


@pytest.mark.parametrize("case", CASES)
def test_ep_with_copies_equals_single_device_oracle(ranks, case):
    for rank, res in enumerate(ranks):
        assert case in res, f"rank {rank} never ran {case}"
        assert not res[case], f"rank {rank}:\n{res[case]}"
