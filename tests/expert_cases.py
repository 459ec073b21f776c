"""Random expert layers for the tests of every expert path (grouped, CPU op, Triton).

Shared by tests/test_lowering.py and tests/test_triton_moe.py so both check their path on the
same forms and the same kind of inputs: distinct experts per token as a top-k gives, a share
of dropped pairs (the sentinel id ``E``), and one token with every pair dropped.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch

from capmoe_compile.experts import ExpertForm

NAN = float("nan")

FORMS = {
    # transformers' layout: gate_up [E, 2F, H] (gate half first), down [E, H, F]
    "swiglu_fused": ExpertForm(("gate_up", "down"), "silu"),
    # Mixtral v0 / DeepSeek style separate projections
    "swiglu_separate": ExpertForm(("gate", "up", "down"), "silu"),
    # Switch / GPT-2 style plain MLP with biases
    "gelu_bias": ExpertForm(("up", "b_up", "down", "b_down"), "gelu"),
    # [in, out] storage (GPT-OSS style), up half first
    "transposed": ExpertForm(
        ("gate_up", "down"), "silu", transposed=("gate_up", "down"), gate_first=False
    ),
}


def gen(*key) -> torch.Generator:
    """A generator seeded from ``key``: every test case gets its own, reproducible stream."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_params(form: ExpertForm, E: int, H: int, F: int, dtype, gen) -> list[torch.Tensor]:
    """Random expert parameters of ``form``, scaled so every activation is O(1)."""
    shapes = {  # nn.Linear storage [out, in]
        "gate_up": (2 * F, H),
        "gate": (F, H),
        "up": (F, H),
        "down": (H, F),
    }
    params = []
    for role in form.roles:
        if role.startswith("b_"):
            out = shapes[role[2:]][0]
            params.append(0.1 * torch.randn(E, out, generator=gen))
            continue
        out, inp = shapes[role]
        w = torch.randn(E, out, inp, generator=gen) / math.sqrt(inp)
        params.append(w.transpose(1, 2).contiguous() if role in form.transposed else w)
    return [p.to(dtype) for p in params]


def random_ids(T: int, E: int, k: int, gen, drop: float = 0.3) -> torch.Tensor:
    """Distinct experts per token (as a top-k gives), a fraction ``drop`` of the pairs
    replaced by the sentinel ``E``, and (for T >= 2) one token with every pair dropped."""
    ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    dropped = torch.rand(T, k, generator=gen) < drop
    ids = ids.masked_fill(dropped, E)
    if T >= 2:
        ids[T // 2] = E
    return ids


@contextlib.contextmanager
def one_thread_poison():
    """One intra-op thread (the CPU op uses its few-row kernels only then), and uninitialised
    memory NaN-filled (``torch.empty`` and the op's scratch), restored after."""
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
