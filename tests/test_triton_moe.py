"""The hand-written Triton fused-MoE path (``capmoe_compile.lowering.triton_moe``) against the
eager reference (``experts.moe_experts_reference``, SPEC.md semantics).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported); with CUDA the same tests run the compiled
kernels. The interpreter is slow, so shapes are small (H, F <= 64, T <= 64), chosen to hit the
kernels' edge cases: T = 1, sizes that are not multiples of the tiles, more than one K step,
expert groups that are empty, smaller than one block and larger than one block, dropped pairs
(sentinel id E), tokens with every pair dropped, duplicate experts in a token, every expert
form and activation, the ids of every capacity policy (expanded_drop's k' > k), fp32 and bf16.

Poison. Every test runs under ``torch.use_deterministic_algorithms(True)`` with
``torch.utils.deterministic.fill_uninitialized_memory``, so every ``torch.empty`` buffer of the
op (the gate/up activations ``h``, the per-pair rows ``y``, the output) starts as NaN (checked
by ``test_poison_is_active``): an element the kernels forget to write, or read without masking,
turns into NaN in the output. The inputs are poisoned where the semantics say they must not be
read: hidden states of tokens whose pairs are all dropped, and routing weights of dropped
pairs, are NaN. Tokens with every pair dropped must come out exactly 0.

torch.compile. ``triton_op`` + ``wrap_triton`` cannot be traced under the interpreter: with
``TRITON_INTERPRET=1`` ``@triton.jit`` returns an ``InterpretedFunction``, which ``wrap_triton``
hands back unwrapped (torch/_library/triton.py), so Dynamo's fake-tensor pass calls the kernel
on FakeTensors and fails ("Cannot access data pointer of Tensor"). And Inductor has no code
generation for user Triton kernels on CPU tensors. So on CPU the op is tested directly, and
the launch prep (the torch part of the op, which Inductor does trace on GPU) is compiled with
``fullgraph=True, dynamic=True`` to prove it has no host sync and no data-dependent shape.
``test_compiled_cuda`` runs the whole op through Inductor where CUDA is available.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import expert_cases  # noqa: E402
from expert_cases import NAN, one_thread_poison, random_ids  # noqa: E402
from expert_cases import gen as _gen  # noqa: E402

from capmoe_compile.experts import ExpertForm, moe_experts_reference  # noqa: E402
from capmoe_compile.lowering import triton_moe  # noqa: E402
from capmoe_compile.lowering.triton_moe import moe_experts_triton  # noqa: E402
from capmoe_compile.routing import POLICIES, route_reference  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16 = torch.float32, torch.bfloat16

if DEV.type == "cpu" and not triton_moe.interpreted():
    raise RuntimeError(
        "no CUDA and triton is not in interpreter mode: TRITON_INTERPRET=1 must be set before "
        "triton is imported (tests/conftest.py does it; was triton imported earlier?)"
    )

FORMS = {
    **expert_cases.FORMS,
    # separate gated projections with biases, tanh GELU, one transposed weight
    "geglu_tanh_bias": ExpertForm(
        ("gate", "up", "b_gate", "b_up", "down", "b_down"), "gelu_tanh", transposed=("down",)
    ),
    # fused gate_up with its bias, up half first
    "gated_bias_fused": ExpertForm(("gate_up", "b_gate_up", "down"), "gelu_tanh", gate_first=False),
    # plain ReLU MLP, transposed up projection
    "relu_mlp": ExpertForm(("up", "down"), "relu", transposed=("up",)),
}


@pytest.fixture(autouse=True, scope="module")
def _poison():
    """Uninitialised memory reads as NaN (see the module docstring); one thread (tiny shapes
    on a shared machine)."""
    with one_thread_poison():
        yield


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_params(form: ExpertForm, E: int, H: int, F: int, dtype, gen) -> list[torch.Tensor]:
    return [p.to(DEV) for p in expert_cases.make_params(form, E, H, F, dtype, gen)]


def make_inputs(ids: torch.Tensor, E: int, H: int, dtype, gen, wdtype=None):
    """Hidden states (NaN for tokens with every pair dropped) and routing weights (NaN for
    dropped pairs)."""
    T = ids.shape[0]
    x = torch.randn(T, H, generator=gen).to(dtype)
    x = x.masked_fill((ids == E).all(-1, keepdim=True), NAN)
    w = torch.rand(ids.shape, generator=gen) + 0.05
    w = (w / w.sum(-1, keepdim=True)).to(wdtype or dtype).masked_fill(ids == E, NAN)
    return x.to(DEV), w.to(DEV)


def _tol(dtype):
    # bf16: the reference rounds every intermediate to bf16, the kernels round h and y once.
    # Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest), so here
    # the kernels' bf16 error is about twice the reference's; the worst case seen was 0.65 of
    # this tolerance.
    if dtype == F32:
        return dict(rtol=1e-4, atol=1e-4)
    if dtype == torch.float16:
        return dict(rtol=5e-3, atol=5e-3)
    return dict(rtol=2e-2, atol=3e-2)


def check(x, ids, w, params, form, what=""):
    """The Triton path against the reference, with the poison checks; returns the output."""
    E = form.num_experts(params)
    ids = ids.to(DEV)
    got = moe_experts_triton(x, ids, w, params, form)
    ref = moe_experts_reference(
        x.cpu(), ids.cpu(), w.nan_to_num(0.0).cpu(), [p.cpu() for p in params], form
    )
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device, what
    assert not got.isnan().any(), f"NaN in output (unwritten or unmasked element) {what}"
    empty = (ids == E).all(-1)
    assert (got[empty] == 0).all(), f"tokens with every pair dropped are not exactly 0 {what}"
    torch.testing.assert_close(
        got.float().cpu(), ref.float(), **_tol(x.dtype), msg=lambda m: f"{what}: {m}"
    )
    return got


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_poison_is_active():
    """The fixture really makes fresh buffers NaN (else the poison checks below prove nothing)."""
    assert torch.empty(8, 8, device=DEV).isnan().all()
    assert torch.empty(8, 8, dtype=BF16, device=DEV).isnan().all()


# (T, E, k, H, F): T = 1, tile remainders (H, F not multiples of 16/32), two K steps (H or F
# of 64 with BLOCK_K = 32), k = E (every expert in every token)
SHAPES = [
    (1, 4, 1, 32, 48),
    (1, 16, 4, 24, 40),
    (5, 8, 2, 16, 20),
    (33, 16, 4, 64, 48),
    (64, 4, 2, 32, 64),
    (20, 4, 4, 40, 24),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form_name", list(FORMS))
def test_forms_shapes(form_name, dtype):
    form = FORMS[form_name]
    for T, E, k, H, F in SHAPES:
        gen = _gen(form_name, str(dtype), T, E, k, H, F)
        params = make_params(form, E, H, F, dtype, gen)
        ids = random_ids(T, E, k, gen)
        x, w = make_inputs(ids, E, H, dtype, gen)
        check(x, ids, w, params, form, f"T={T} E={E} k={k} H={H} F={F}")


def _skewed_ids(T: int, E: int, k: int, gen) -> torch.Tensor:
    """Most pairs on experts 0 and 1, experts E-2 and E-1 never chosen, some pairs dropped."""
    logits = torch.randn(T, E, generator=gen) + torch.linspace(4.0, -4.0, E)
    logits[:, -2:] = -float("inf")
    ids = logits.topk(k, dim=-1).indices
    return ids.masked_fill(torch.rand(T, k, generator=gen) < 0.15, E)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (16, 4)], ids=["E4k1", "E8k2", "E16k4"])
def test_groups_larger_than_a_block_and_empty(E, k, dtype):
    """Groups that span several BLOCK_M blocks (with a partial last block), next to empty ones."""
    T, H, F = 64, 32, 48
    form = FORMS["swiglu_fused"]
    gen = _gen("skew", E, k, str(dtype))
    ids = _skewed_ids(T, E, k, gen)
    block_m = triton_moe.pick_config(ids.numel(), E)["BLOCK_M"]
    counts = torch.bincount(ids.flatten(), minlength=E + 1)[:E]
    assert counts.max() > 2 * block_m and counts.max() % block_m != 0, counts  # several blocks
    assert (counts == 0).any() and (ids == E).any(), counts  # empty groups, dropped pairs
    params = make_params(form, E, H, F, dtype, gen)
    x, w = make_inputs(ids, E, H, dtype, gen)
    check(x, ids, w, params, form, f"counts={counts.tolist()}")


@pytest.mark.parametrize("form_name", ["swiglu_fused", "gelu_bias"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_all_dropped(form_name, dtype):
    """Every pair dropped: exactly zero out, nothing read (x and weights are all NaN)."""
    form = FORMS[form_name]
    for T, E, k in ((1, 4, 2), (17, 8, 1)):
        params = make_params(form, E, 32, 48, dtype, _gen("all_dropped", T, E, k))
        ids = torch.full((T, k), E, device=DEV)
        x = torch.full((T, 32), NAN, dtype=dtype, device=DEV)
        w = torch.full((T, k), NAN, dtype=dtype, device=DEV)
        got = moe_experts_triton(x, ids, w, params, form)
        assert (got == 0).all()


def test_empty_batch_and_dtype_mismatch():
    form = FORMS["swiglu_fused"]
    params = make_params(form, 4, 32, 48, F32, _gen("empty"))
    x = torch.empty(0, 32, device=DEV)
    ids = torch.empty(0, 2, dtype=torch.long, device=DEV)
    got = moe_experts_triton(x, ids, torch.empty(0, 2, device=DEV), params, form)
    assert got.shape == (0, 32)
    with pytest.raises(TypeError, match="dtype"):
        moe_experts_triton(x.to(BF16), ids, torch.empty(0, 2, device=DEV), params, form)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_no_drops_and_duplicates(dtype):
    """No sentinel at all, and the same expert twice in one token (two separate pairs)."""
    form = FORMS["swiglu_separate"]
    for T, E, k in ((1, 4, 4), (24, 8, 4)):
        gen = _gen("dups", T, E, k, str(dtype))
        params = make_params(form, E, 32, 48, dtype, gen)
        ids = random_ids(T, E, k, gen, drop=0.0)
        ids[T // 2] = torch.arange(k) % E  # random_ids' all-dropped token, refilled
        x, w = make_inputs(ids, E, 32, dtype, gen)
        check(x, ids, w, params, form, f"T={T}")
        dup = ids.clone()
        dup[:, -1] = dup[:, 0]
        check(x, dup, w, params, form, f"dup T={T}")


def test_fp16():
    form = FORMS["swiglu_fused"]
    gen = _gen("fp16")
    params = make_params(form, 8, 32, 48, torch.float16, gen)
    ids = random_ids(40, 8, 2, gen)
    x, w = make_inputs(ids, 8, 32, torch.float16, gen)
    check(x, ids, w, params, form)


def test_bf16_with_fp32_weights():
    """Routers that give fp32 gate weights next to bf16 hidden states and experts."""
    form = FORMS["gelu_bias"]
    gen = _gen("bf16_fp32w")
    params = make_params(form, 8, 32, 48, BF16, gen)
    ids = random_ids(40, 8, 2, gen)
    x, w = make_inputs(ids, 8, 32, BF16, gen, wdtype=F32)
    check(x, ids, w, params, form)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_ids(policy):
    """ids/weights exactly as each capacity policy emits them (expanded_drop: k' = E columns)."""
    T, E, k, H, F = 48, 8, 2, 32, 48
    form = FORMS["swiglu_fused"]
    for gamma in (0.5, 1.0):
        gen = _gen("policy", policy, gamma)
        logits = torch.randn(T, E, generator=gen) + torch.linspace(2.0, -2.0, E)
        probs = logits.softmax(-1)
        w, ids = probs.topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids, w = route_reference(probs, ids, w, capacity_factor=gamma, policy=policy, seed=3)
        assert ids.shape[1] == (E if policy == "expanded_drop" else k)
        assert (ids == E).any()
        params = make_params(form, E, H, F, F32, gen)
        x, _ = make_inputs(ids, E, H, F32, gen)
        w = w.masked_fill(ids == E, NAN).to(DEV)
        check(x, ids, w, params, form, f"gamma={gamma}")


def test_form_given_as_string():
    form = FORMS["transposed"]
    gen = _gen("str")
    params = make_params(form, 4, 32, 48, F32, gen)
    ids = random_ids(7, 4, 2, gen)
    x, w = make_inputs(ids, 4, 32, F32, gen)
    got = moe_experts_triton(x, ids.to(DEV), w, params, form.to_str())
    torch.testing.assert_close(got, check(x, ids, w, params, form))


# ---------------------------------------------------------------------------------------------
# launch prep
# ---------------------------------------------------------------------------------------------


def _check_alignment(ids, E, block_m, slot_pair, block_expert):
    N = ids.numel()
    flat = ids.reshape(-1).cpu()
    slot_pair, block_expert = slot_pair.cpu().long(), block_expert.cpu().long()
    assert slot_pair.numel() == triton_moe.num_slots(N, E, block_m)
    assert slot_pair.numel() % block_m == 0 and block_expert.numel() == slot_pair.numel() // block_m
    real = slot_pair[slot_pair < N]
    # every kept pair exactly once, no dropped pair at all, padding marked N
    assert sorted(real.tolist()) == (flat < E).nonzero().squeeze(-1).tolist()
    assert ((slot_pair < N) | (slot_pair == N)).all()
    # each block is one expert's; used blocks first, in expert order; then the unused (E)
    slot_e = block_expert.repeat_interleave(block_m)
    assert (flat[real] == slot_e[slot_pair < N]).all()
    assert (block_expert.diff() >= 0).all() and block_expert.max() <= E
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    blocks = torch.bincount(block_expert, minlength=E + 1)[:E]
    assert (blocks == (counts + block_m - 1) // block_m).all()
    assert (slot_pair[slot_e == E] == N).all()
    # within an expert's group: pairs in pair order, padding only at the end
    for e in range(E):
        s = slot_pair[slot_e == e]
        n = int(counts[e])
        assert (s[:n].diff() > 0).all() and (s[n:] == N).all()


def test_align_by_expert():
    for T, E, k, block_m in ((1, 4, 1, 16), (7, 8, 2, 16), (64, 8, 2, 16), (300, 16, 4, 64)):
        ids = _skewed_ids(T, E, k, _gen("align", T, E, k))
        sp, be = triton_moe.align_by_expert(ids.to(DEV), E, block_m)
        _check_alignment(ids, E, block_m, sp, be)
        all_dropped = torch.full_like(ids, E)
        sp, be = triton_moe.align_by_expert(all_dropped.to(DEV), E, block_m)
        assert (sp == T * k).all() and (be == E).all()


def test_align_by_expert_compiles_static():
    """The torch part of the op under Inductor, fullgraph and dynamic: no graph break (so no
    host sync, no data-dependent shape) and one graph for many T, k and routings."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    fn = torch.compile(triton_moe.align_by_expert, backend=counter, fullgraph=True, dynamic=True)
    E, block_m = 8, 16
    with torch._inductor.config.patch(compile_threads=1):
        for T, k in ((7, 2), (64, 2), (33, 3), (200, 4)):
            ids = _skewed_ids(T, E, k, _gen("align_compiled", T, k)).to(DEV)
            sp, be = fn(ids, E, block_m)
            ref_sp, ref_be = triton_moe.align_by_expert(ids, E, block_m)
            assert torch.equal(sp, ref_sp) and torch.equal(be, ref_be)
            _check_alignment(ids, E, block_m, sp, be)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# registration, supports, compile
# ---------------------------------------------------------------------------------------------


def test_registered_op():
    assert torch.ops.capmoe.triton_moe_experts.default is not None
    form = FORMS["swiglu_fused"]
    gen = _gen("op")
    params = make_params(form, 4, 32, 48, F32, gen)
    ids = random_ids(5, 4, 2, gen).to(DEV)
    x, w = make_inputs(ids.cpu(), 4, 32, F32, gen)
    got = torch.ops.capmoe.triton_moe_experts(x, ids, w, params, form.to_str())
    torch.testing.assert_close(got, moe_experts_triton(x, ids, w, params, form))


def test_supports():
    dev = DEV
    assert triton_moe.supports(FORMS["swiglu_fused"], F32, dev)
    assert triton_moe.supports(FORMS["gelu_bias"], BF16, dev)
    assert not triton_moe.supports(FORMS["swiglu_fused"], torch.float64, dev)
    per_expert = ExpertForm(("gate_up", "down"), "silu", stacked=False)
    assert not triton_moe.supports(per_expert, F32, dev)
    if not triton_moe.interpreted():
        assert not triton_moe.supports(FORMS["swiglu_fused"], F32, "cpu")


def test_configs_table():
    """Every shape class has a config; BLOCK sizes are powers of two >= 16 (tl.dot's minimum)."""
    for N, E in ((16, 8), (512, 8), (8192, 8), (4096, 64)):
        assert triton_moe.shape_class(N, E) in triton_moe.CONFIGS
    for cfg in [*triton_moe.CONFIGS.values(), triton_moe.INTERPRET_CONFIG]:
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (see module docstring)")
def test_compiled_cuda():
    """The op under torch.compile with Inductor: the Triton kernels are inlined, not opaque."""
    from torch._inductor.utils import run_and_get_code

    form = FORMS["swiglu_fused"]
    s = form.to_str()
    fn = torch.compile(
        lambda x, ids, w, params: moe_experts_triton(x, ids, w, params, s),
        fullgraph=True,
        dynamic=True,
    )
    for T, E, k in ((7, 8, 2), (64, 16, 4)):
        gen = _gen("compiled", T, E, k)
        params = make_params(form, E, 64, 64, BF16, gen)
        ids = random_ids(T, E, k, gen).to(DEV)
        x, w = make_inputs(ids.cpu(), E, 64, BF16, gen)
        got, code = run_and_get_code(fn, x, ids, w, params)
        ref = moe_experts_triton(x, ids, w, params, form)
        torch.testing.assert_close(got, ref, **_tol(BF16))
        assert "_gate_up_kernel" in "".join(code) and "_down_kernel" in "".join(code)
