"""The grouped-GEMM fast path (``capmoe_compile.lowering.grouped``) against the eager reference.

``moe_experts_grouped(x, ids, weights, params, form)`` must compute what
``moe_experts_reference`` computes (SPEC.md: ``out[t] = sum_j weights[t, j] *
expert_{ids[t, j]}(x[t])``, the sentinel id ``E`` skipped), on random inputs of many shapes
(T in {1, 2, 7, 64, 300, 4096}, E in {4, 8, 16, 64, 128}, k in {1, 2, 4, 8}), fp32 and bf16,
every expert form the passes emit (fused gate_up SwiGLU, separate gate/up, plain GELU MLP with
biases, transposed storage), ids with sentinels and ids from every capacity policy, eager and
under ``torch.compile(fullgraph=True, dynamic=True)`` with Inductor.

Poison. The fast path allocates its own buffers (there is no ``out=`` to prefill), and
``torch._grouped_mm`` leaves the rows of dropped pairs unwritten. Every test here runs under
``torch.use_deterministic_algorithms(True)``, which makes ``torch.empty`` (and so every
uninitialised buffer of every eager kernel, ``_grouped_mm``'s output included) start as NaN: an
element the fast path forgets to write, or reads without masking, turns into NaN in the output.
On top of that the inputs are poisoned where the semantics say they must not matter: the hidden
states of tokens whose pairs are all dropped, and the weights of dropped pairs, are NaN. Tokens
whose pairs are all dropped must come out exactly 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo.testing
from expert_cases import FORMS, NAN, make_params, random_ids
from expert_cases import gen as _gen

from capmoe_compile.experts import ExpertForm, moe_experts_reference
from capmoe_compile.lowering import cpu_experts, grouped
from capmoe_compile.lowering.grouped import moe_experts_grouped
from capmoe_compile.routing import POLICIES, route_reference

F32, BF16 = torch.float32, torch.bfloat16


EK = [(E, k) for E in (4, 8, 16, 64, 128) for k in (1, 2, 4, 8) if k <= E]
TS = (1, 2, 7, 64, 300)


@pytest.fixture(autouse=True, scope="module")
def _poison_and_limits():
    """Uninitialised memory reads as NaN; enough Dynamo cache entries for every form/dtype.

    One intra-op thread: the shapes here are tiny, and on a shared 2-core machine OpenMP's
    spin-waiting made the same tests 10-20x slower with two threads than with one.
    """
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with (
            torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512),
            # small graphs: compiling in-process beats starting a pool of compile workers
            torch._inductor.config.patch(compile_threads=1),
            # no equality guards between sizes that happen to coincide (T == k, E == H, ...)
            torch.fx.experimental._config.patch(use_duck_shape=False),
        ):
            yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def random_weights(ids: torch.Tensor, E: int, dtype, gen) -> torch.Tensor:
    """Positive gate weights; NaN where the pair is dropped (they must never be read)."""
    w = torch.rand(ids.shape, generator=gen) + 0.05
    w = w / w.sum(-1, keepdim=True)
    return w.to(dtype).masked_fill(ids == E, NAN)


def poison_dropped_tokens(x: torch.Tensor, ids: torch.Tensor, E: int) -> torch.Tensor:
    """NaN hidden states for tokens whose pairs are all dropped (no expert may read them)."""
    return x.masked_fill((ids == E).all(-1, keepdim=True), NAN)


def routed_ids(T, E, k, policy, gamma, gen, skew: float = 2.0):
    """``route_reference`` on a skewed softmax router (so capacity actually drops pairs)."""
    logits = torch.randn(T, E, generator=gen) + torch.linspace(skew, -skew, E)
    probs = logits.softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return route_reference(probs, ids, w, capacity_factor=gamma, policy=policy, seed=3)


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == F32 else dict(rtol=2e-2, atol=2e-2)


def check(fn, x, ids, w, params, form, E, what=""):
    """``fn`` (the fast path, eager or compiled) against the reference, with poison checks."""
    ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form)
    got = fn(x, ids, w, params, form)
    assert got.shape == x.shape and got.dtype == x.dtype, what
    assert not got.isnan().any(), f"NaN in output {what}"
    # Sentinel-only tokens: exactly zero (their hidden states are NaN, so any read shows).
    empty = (ids == E).all(-1)
    if empty.any():
        assert (got[empty] == 0).all(), f"dropped-only tokens are not exactly 0 {what}"
    torch.testing.assert_close(
        got.float(), ref.float(), **_tol(x.dtype), msg=lambda m: f"{what}: {m}"
    )
    return got


def make_case(form, T, E, k, dtype, H=32, F=48, drop=0.3, wdtype=None, seed=0):
    gen = _gen(form, T, E, k, str(dtype), H, F, seed)
    params = make_params(form, E, H, F, dtype, gen)
    ids = random_ids(T, E, k, gen, drop)
    x = poison_dropped_tokens(torch.randn(T, H, generator=gen).to(dtype), ids, E)
    w = random_weights(ids, E, wdtype or dtype, gen)
    return x, ids, w, params


def _hw(E):
    # keep the E=128 cases cheap: the reference loops over experts
    return (16, 24) if E >= 64 else (32, 48)


# ---------------------------------------------------------------------------------------------
# eager fast path
# ---------------------------------------------------------------------------------------------


# Both implementations behind moe_experts_grouped, each checked on CPU: capmoe::experts_cpu
# (the per-expert loop, lowering/cpu_experts.py: CPU layers of at least CPU_OP_MIN_WEIGHTS) and
# the traced grouped-GEMM path (smaller CPU layers, other devices); and the dispatch itself.
def cpu_op(x, ids, w, params, form, tile=None):
    """capmoe::experts_cpu called directly (moe_experts_grouped only picks it for layers of at
    least grouped.CPU_OP_MIN_WEIGHTS expert weights; the cases here are smaller)."""
    f = form if isinstance(form, str) else form.to_str()
    return cpu_experts.experts_cpu(x, ids, w, params, f, tile)


IMPLS = {
    "dispatch": moe_experts_grouped,
    "cpu_op": cpu_op,
    "traced": grouped.moe_experts_traced,
}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form_name", list(FORMS))
@pytest.mark.parametrize("E,k", EK, ids=[f"E{E}k{k}" for E, k in EK])
def test_eager_shapes(form_name, E, k, dtype, impl):
    form = FORMS[form_name]
    H, F = _hw(E)
    for T in TS:
        x, ids, w, params = make_case(form, T, E, k, dtype, H, F)
        check(impl, x, ids, w, params, form, E, f"T={T}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_eager_large_T(dtype, impl):
    """T=4096 (the issue's upper end), kept cheap with a small layer."""
    form = FORMS["swiglu_fused"]
    x, ids, w, params = make_case(form, 4096, 64, 8, dtype, H=16, F=16)
    check(impl, x, ids, w, params, form, 64)


@pytest.mark.parametrize("form_name", list(FORMS))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_eager_all_dropped(form_name, dtype, impl):
    """Every pair dropped (including T=1): the output is exactly zero, no GEMM row is read."""
    form = FORMS[form_name]
    for T, E, k in ((1, 4, 2), (5, 8, 1), (64, 16, 4)):
        gen = _gen("all_dropped", T, E, k)
        params = make_params(form, E, 32, 48, dtype, gen)
        ids = torch.full((T, k), E)
        x = torch.full((T, 32), NAN, dtype=dtype)
        w = torch.full((T, k), NAN, dtype=dtype)
        got = impl(x, ids, w, params, form)
        assert (got == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_eager_no_drops_and_duplicates(dtype, impl):
    """No sentinel at all (every GEMM row written), and repeated experts within a token."""
    form = FORMS["swiglu_fused"]
    for T, E, k in ((1, 4, 4), (7, 4, 4), (64, 8, 8), (300, 16, 2)):
        x, ids, w, params = make_case(form, T, E, k, dtype, drop=0.0)
        ids[T // 2] = torch.arange(k) % E  # make_case's all-dropped row, refilled
        w = w.nan_to_num(0.5)
        x = x.nan_to_num(1.0)
        check(impl, x, ids, w, params, form, E, f"T={T}")
        dup = ids.clone()
        dup[:, -1] = dup[:, 0]
        check(impl, x, dup, w, params, form, E, f"dup T={T}")


def test_eager_bf16_with_fp32_weights(impl):
    """Mixtral-style routers give fp32 gate weights next to bf16 hidden states and experts."""
    for form_name in FORMS:
        form = FORMS[form_name]
        x, ids, w, params = make_case(form, 64, 8, 2, BF16, wdtype=F32)
        check(impl, x, ids, w, params, form, 8, form_name)


def test_form_given_as_string():
    """The backend passes the form through the FX graph as its string."""
    form = FORMS["transposed"]
    x, ids, w, params = make_case(form, 7, 8, 2, F32)
    got = moe_experts_grouped(x, ids, w, params, form.to_str())
    torch.testing.assert_close(got, moe_experts_grouped(x, ids, w, params, form))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_eager_unaligned_sizes(dtype, impl):
    """H and F that are not multiples of 16 bytes (torch._grouped_mm's stride rule)."""
    form = FORMS["swiglu_fused"]
    for H, F in ((12, 20), (6, 10), (100, 36)):
        x, ids, w, params = make_case(form, 7, 4, 2, dtype, H=H, F=F)
        check(impl, x, ids, w, params, form, 4, f"H={H} F={F}")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_eager_policy_ids(policy, gamma, dtype, impl):
    """ids/weights exactly as every capacity policy emits them (expanded_drop: k' columns)."""
    for T, E, k in ((2, 4, 2), (64, 8, 2), (300, 16, 4), (300, 64, 8), (7, 128, 1)):
        gen = _gen("policy", policy, gamma, T, E, k, str(dtype))
        form = FORMS["swiglu_fused"]
        H, F = _hw(E)
        ids, w = routed_ids(T, E, k, policy, gamma, gen)
        assert ids.shape[1] == (E if policy == "expanded_drop" else k)
        params = make_params(form, E, H, F, dtype, gen)
        x = poison_dropped_tokens(torch.randn(T, H, generator=gen).to(dtype), ids, E)
        w = w.masked_fill(ids == E, NAN)
        check(impl, x, ids, w, params, form, E, f"T={T} E={E} k={k}")


def test_policy_ids_do_drop():
    """The routed cases above really exercise drops and all-dropped tokens."""
    gen = _gen("drops")
    ids, _ = routed_ids(300, 16, 1, "score", 0.5, gen)
    assert (ids == 16).any() and (ids == 16).all(-1).any()
    ids, _ = routed_ids(300, 16, 4, "expanded_drop", 1.0, gen)
    assert (ids[:, 4:] < 16).any()  # added pairs


def test_grouped_mm_op():
    """The custom op behind the GEMMs: schema, fake kernel, dynamic shapes."""
    a = torch.randn(10, 16)
    b = torch.randn(3, 8, 16).transpose(-2, -1)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # an empty group in the middle
    torch.library.opcheck(torch.ops.capmoe.grouped_mm.default, (a, b, offs))
    ref = torch.cat([a[:3] @ b[0], a[3:] @ b[2]])
    torch.testing.assert_close(grouped.grouped_mm(a, b, offs), ref)


def test_experts_cpu_op():
    """capmoe::experts_cpu: schema, fake kernel, with and without a batch-invariant tile."""
    form = FORMS["swiglu_fused"]
    x, ids, w, params = make_case(form, 7, 4, 2, F32, H=16, F=8, drop=0.0)
    x, w = x.nan_to_num(1.0), w.nan_to_num(0.5)
    args = (x, ids, w, params, form.to_str())
    torch.library.opcheck(torch.ops.capmoe.experts_cpu.default, args)
    torch.library.opcheck(torch.ops.capmoe.experts_cpu.default, (*args, torch.tensor(4)))


# Group sizes around the op's switches: 1..6 rows (torch.mm as rows @ W), 7..256 (computed
# transposed, W^T @ rows^T), > 256 (rows @ W again, cut into chunks), an empty expert.
CPU_SIZES = (1, 6, 7, 0, 31, 256, 257, 700)


def _sized_case(form, sizes, dtype, H, F, seed=0, drop=37):
    """k=1 ids giving expert e exactly sizes[e] rows (shuffled), plus ``drop`` sentinel rows
    whose hidden states and weights are NaN."""
    E = len(sizes)
    gen = _gen("sized", form, sizes, str(dtype), H, F, seed)
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(sizes)] + [torch.full((drop,), E)])
    ids = flat[torch.randperm(flat.numel(), generator=gen)][:, None]
    params = make_params(form, E, H, F, dtype, gen)
    x = poison_dropped_tokens(torch.randn(ids.shape[0], H, generator=gen).to(dtype), ids, E)
    w = random_weights(ids, E, dtype, gen)
    return x, ids, w, params


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form_name", list(FORMS))
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["chunks_default", "chunks_small"])
@pytest.mark.parametrize("transposed", ["one_thread", "many_rows", "off"])
def test_cpu_group_sizes_and_chunks(form_name, dtype, chunk_bytes, transposed, monkeypatch):
    """Every code path of the CPU op by group size, and experts cut into many chunks (every
    row of every chunk written, weighted and combined exactly once)."""
    # Groups computed transposed: 2..6 rows with one intra-op thread (these tests run with
    # one: the module's defaults); with more threads 7..256 rows of layers with H * F >= 2 Mi
    # (forced here with TRANSPOSED_MIN_THREADS=1 and TRANSPOSED_MIN_HF=0); or none.
    if transposed != "one_thread":
        monkeypatch.setattr(cpu_experts, "TRANSPOSED_MIN_THREADS", 1)
        monkeypatch.setattr(
            cpu_experts, "TRANSPOSED_MIN_HF", 0 if transposed == "many_rows" else 1 << 62
        )
    expect = {"one_thread": range(2, 7), "many_rows": range(7, 257), "off": range(0)}
    assert cpu_experts._transposed_rows(big=transposed != "off") == expect[transposed]
    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_experts, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(cpu_experts, "MIN_CHUNK_ROWS", 97)  # 700 -> 8 chunks of 87-88
    form = FORMS[form_name]
    x, ids, w, params = _sized_case(form, CPU_SIZES, dtype, H=32, F=24)
    check(cpu_op, x, ids, w, params, form, len(CPU_SIZES))
    n = ids.numel() // 8 * 8
    for k_ids in (ids[:n].reshape(-1, 2), ids[:n].reshape(-1, 8)):
        # the same pairs as k = 2 and k = 8 tokens (duplicates within a token included)
        k_x = poison_dropped_tokens(torch.randn(k_ids.shape[0], 32).to(dtype), k_ids, 8)
        k_w = random_weights(k_ids, 8, dtype, _gen("kw", k_ids.shape))
        check(cpu_op, k_x, k_ids, k_w, params, form, 8, f"k={k_ids.shape[1]}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form_name", list(FORMS))
def test_cpu_tiles_batch_invariant(form_name, dtype):
    """tile > 0: the reference's tiled semantics, and every token's output bit-for-bit the same
    whatever else is in the batch (each group's size changes; the tile does not)."""
    form = FORMS[form_name]
    E = len(CPU_SIZES)
    x, ids, w, params = _sized_case(form, CPU_SIZES, dtype, H=32, F=24)
    # Tiles of 1 or a multiple of 16 rows (TILE is 64): ATen's vectorised elementwise loops
    # finish a contiguous tensor's last < 16 elements with scalar code, so with other tiles a
    # row's activation bits would depend on its position in the tile (the reference's too).
    for tile in (1, 16, 64):
        t = torch.tensor(tile)
        ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), params, form, tile)
        got = check(lambda *a, t=t: cpu_op(*a, t), x, ids, w, params, form, E)
        torch.testing.assert_close(got.float(), ref.float(), **_tol(dtype))
        for sub in (slice(0, 1), slice(5, 200), slice(100, None)):
            part = cpu_op(x[sub], ids[sub], w[sub], params, form, t)
            assert torch.equal(part, got[sub]), f"tile={tile} rows {sub}: batch-dependent bits"


def test_supports():
    assert grouped.supports(FORMS["swiglu_fused"], F32)
    assert grouped.supports(FORMS["gelu_bias"], BF16)
    assert not grouped.supports(FORMS["swiglu_fused"], torch.float16)
    per_expert = ExpertForm(("gate_up", "down"), "silu", stacked=False)
    assert not grouped.supports(per_expert, F32)


# ---------------------------------------------------------------------------------------------
# compiled: torch.compile(fullgraph=True, dynamic=True) with Inductor
# ---------------------------------------------------------------------------------------------

_compiled = {}


def compiled():
    """One compiled fast path for the whole module (its cache holds a graph per form/dtype)."""
    if "fn" not in _compiled:
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        _compiled["counter"] = counter
        _compiled["fn"] = torch.compile(
            moe_experts_grouped, backend=counter, fullgraph=True, dynamic=True
        )
    return _compiled["fn"], _compiled["counter"]


# Shapes that share one dynamic graph: T >= 2 and k >= 2 (Dynamo specialises sizes 0 and 1).
GENERAL = [
    (T, E, k)
    for (T, (E, k)) in itertools.product(
        (2, 7, 64, 300), ((4, 2), (8, 2), (16, 4), (64, 8), (128, 8))
    )
]


def test_compiled_swiglu_fp32_dynamic():
    """Many T, E, k, sentinels and every policy's ids through one graph: no recompile."""
    fn, counter = compiled()
    form = FORMS["swiglu_fused"]
    before = counter.frame_count
    for T, E, k in GENERAL:
        H, F = _hw(E)
        x, ids, w, params = make_case(form, T, E, k, F32, H, F)
        check(fn, x, ids, w, params, form, E, f"T={T} E={E} k={k}")
    for policy, gamma in itertools.product(POLICIES, (0.5, 1.0)):
        T, E, k = 64, 16, 4
        gen = _gen("compiled_policy", policy, gamma)
        ids, w = routed_ids(T, E, k, policy, gamma, gen)
        params = make_params(form, E, 32, 48, F32, gen)
        x = poison_dropped_tokens(torch.randn(T, 32, generator=gen), ids, E)
        w = w.masked_fill(ids == E, NAN)
        check(fn, x, ids, w, params, form, E, f"{policy} gamma={gamma}")
    assert counter.frame_count - before <= 1, "dynamic shapes should need one graph"
    # T * k >= 32767: Inductor lowers the stable sort to a kernel only below that size, so
    # this is a second graph (one recompile per model for long prefills).
    x, ids, w, params = make_case(form, 4096, 64, 8, F32, H=16, F=16)
    check(fn, x, ids, w, params, form, 64, "T=4096")
    assert counter.frame_count - before <= 2


def test_compiled_edge_sizes():
    """T = 1 and k = 1 (Dynamo's 0/1 specialisations), sentinel-only decode token included."""
    fn, _ = compiled()
    form = FORMS["swiglu_fused"]
    for T, E, k in ((1, 8, 2), (1, 64, 8), (64, 8, 1), (300, 128, 1), (1, 4, 1)):
        H, F = _hw(E)
        x, ids, w, params = make_case(form, T, E, k, F32, H, F)
        check(fn, x, ids, w, params, form, E, f"T={T} E={E} k={k}")
        ids = torch.full_like(ids, E)
        x = torch.full_like(x, NAN)
        w = torch.full_like(w, NAN)
        assert (fn(x, ids, w, params, form) == 0).all()


@pytest.mark.parametrize("form_name", ["swiglu_separate", "gelu_bias", "transposed"])
def test_compiled_forms_fp32(form_name):
    fn, _ = compiled()
    form = FORMS[form_name]
    for T, E, k in ((2, 4, 2), (7, 8, 2), (300, 16, 4), (64, 128, 8)):
        H, F = _hw(E)
        x, ids, w, params = make_case(form, T, E, k, F32, H, F)
        check(fn, x, ids, w, params, form, E, f"T={T} E={E} k={k}")
    gen = _gen("expanded", form_name)
    ids, w = routed_ids(64, 8, 2, "expanded_drop", 1.0, gen)
    params = make_params(form, 8, 32, 48, F32, gen)
    x = poison_dropped_tokens(torch.randn(64, 32, generator=gen), ids, 8)
    check(fn, x, ids, w.masked_fill(ids == 8, NAN), params, form, 8, "expanded_drop")


@pytest.mark.parametrize("form_name", ["swiglu_fused", "gelu_bias"])
def test_compiled_bf16(form_name):
    fn, _ = compiled()
    form = FORMS[form_name]
    for T, E, k in ((2, 4, 2), (7, 8, 2), (300, 16, 4), (64, 64, 8)):
        H, F = _hw(E)
        x, ids, w, params = make_case(form, T, E, k, BF16, H, F)
        check(fn, x, ids, w, params, form, E, f"T={T} E={E} k={k}")
    if form_name != "swiglu_fused":
        return
    # fp32 gate weights (Mixtral's router) with bf16 experts, ids from a capacity policy
    gen = _gen("bf16_policy", form_name)
    ids, w = routed_ids(300, 16, 4, "score", 0.5, gen)
    params = make_params(form, 16, 32, 48, BF16, gen)
    x = poison_dropped_tokens(torch.randn(300, 32, generator=gen).to(BF16), ids, 16)
    check(fn, x, ids, w.masked_fill(ids == 16, NAN), params, form, 16, "score 0.5, fp32 w")


def test_dispatch_by_layer_size():
    """moe_experts_grouped picks capmoe::experts_cpu for large CPU layers, and the op path
    compiles (fullgraph, dynamic T) into an extern call that matches the reference."""
    form = FORMS["swiglu_fused"]
    E, H, F = 8, 512, 512  # 8 * 3 * 512 * 512 = 6 Mi expert weights
    gen = _gen("dispatch", E, H, F)
    params = make_params(form, E, H, F, F32, gen)
    assert sum(p.numel() for p in params) >= grouped.CPU_OP_MIN_WEIGHTS
    graphs = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def layer(x, ids, w, params):
        return moe_experts_grouped(x, ids, w, params, form)

    fn = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    for T, k in ((7, 2), (64, 2), (300, 4)):
        ids = random_ids(T, E, k, gen)
        x = poison_dropped_tokens(torch.randn(T, H, generator=gen), ids, E)
        w = random_weights(ids, E, F32, gen)
        check(lambda *a: fn(*a[:4]), x, ids, w, params, form, E, f"compiled T={T}")
        check(moe_experts_grouped, x, ids, w, params, form, E, f"eager T={T}")
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    assert any("experts_cpu" in t for t in targets), targets
    assert not any("grouped_mm" in t for t in targets), targets
    assert len(graphs) <= 2  # T = 7 / 64 / 300 share one dynamic graph (k = 4 may add one)


# ---------------------------------------------------------------------------------------------
# bf16 end to end (issue 26): every path against SPEC's eager reference, both combine roundings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["float32", "dtype"])
@pytest.mark.parametrize("form_name", list(FORMS))
def test_bf16_combine_roundings(form_name, combine, impl):
    """bf16 layers, random inputs of several shapes, each ``ExpertForm.combine``: the CPU op,
    the traced path and the dispatch against ``moe_experts_reference`` (bf16 GEMMs with fp32
    accumulation; the combine in fp32, or in bf16 in ascending expert id for "dtype")."""
    import dataclasses

    form = dataclasses.replace(FORMS[form_name], combine=combine)
    for T, E, k in ((1, 8, 2), (7, 8, 2), (64, 16, 4), (300, 64, 8)):
        H, F = _hw(E)
        x, ids, w, params = make_case(form, T, E, k, BF16, H, F, seed=26)
        check(impl, x, ids, w, params, form, E, f"{combine} T={T} E={E} k={k}")
        # Mixtral's fp32 routing weights next to bf16 experts
        x, ids, w, params = make_case(form, T, E, k, BF16, H, F, wdtype=F32, seed=27)
        check(impl, x, ids, w, params, form, E, f"{combine} fp32 w T={T} E={E} k={k}")


@pytest.mark.parametrize("impl_name", ["cpu_op", "traced"])
def test_bf16_combine_dtype_rounds_as_the_layer(impl_name):
    """A case where the two roundings differ: identity experts, one token routed to experts
    0, 1, 2 with weights 1, 0.0048828125, 0.0048828125 (each 0.625 of a bf16 ulp at 1).
    Added in bf16 in ascending expert id (the layer's own loop): 1 -> 1.0078125 -> 1.015625;
    in fp32 and rounded once: 1.009765625 -> 1.0078125. Each path follows the form."""
    import dataclasses

    fn = IMPLS[impl_name]
    H = 16
    E = 4
    eye = torch.eye(H).expand(E, H, H).contiguous().to(BF16)
    base = ExpertForm(("up", "down"), "relu")
    x = torch.ones(2, H, dtype=BF16)
    ids = torch.tensor([[2, 0, 1], [E, E, E]])  # token 1: every pair dropped
    small = 2.0**-8 + 2.0**-10
    w = torch.tensor([[small, 1.0, small], [NAN, NAN, NAN]], dtype=BF16)
    for combine, want in (("dtype", 1.015625), ("float32", 1.0078125)):
        form = dataclasses.replace(base, combine=combine)
        ref = moe_experts_reference(x, ids, w.nan_to_num(0.0), [eye, eye], form)
        got = fn(x, ids, w, [eye, eye], form)
        assert (ref[0] == want).all(), (combine, ref[0, 0])
        assert torch.equal(got, ref), (impl_name, combine, got[0, 0])
        assert (got[1] == 0).all()
