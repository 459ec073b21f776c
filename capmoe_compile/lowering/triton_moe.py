"""Fused MoE experts as hand-written Triton kernels (the GPU path), registered with
``torch.library.triton_op`` so that Inductor sees each kernel launch (``wrap_triton``).

``moe_experts_triton(x, ids, weights, params, form)`` has the signature and the semantics of
``grouped.moe_experts_grouped``: ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``,
the sentinel id ``E`` skipped (a dropped pair reads nothing and costs no GEMM work).

How it runs (no host synchronisation, no data-dependent shape anywhere):

1. Launch prep in torch. The ``N = T * k'`` (token, slot) pairs are sorted by expert id (the
   sentinel ``E`` sorts last) and laid out in a slot buffer in which every expert's group is
   padded to a multiple of ``BLOCK_M``. ``N + E * (BLOCK_M - 1)`` slots always suffice, so the
   buffer and both grids have static sizes. Each slot holds its pair index (``N`` for padding);
   each block of ``BLOCK_M`` slots belongs to one expert, recorded per block (``E`` for the
   unused blocks at the end, which exit at once). Sentinel pairs get no slot at all.
2. ``_gate_up_kernel``: for each block, the gathered token rows times the expert's gate/up
   weights, the activation fused in the epilogue (``act(gate) * up`` for gated MLPs, ``act(up)``
   otherwise; biases optional) -> ``h`` [slots, F].
3. ``_down_kernel``: ``h @ W_down[e]`` (+ bias), times the routing weight of the pair in the
   epilogue, written to row ``t * k' + j`` of ``y`` [N, H] (one row per pair: no atomics).
4. ``_combine_kernel``: ``out[t] = sum_j y[t * k' + j]`` over the kept pairs, in token order,
   accumulated in fp32. Rows of dropped pairs are never read (they are never written either).

Weight orientation (``ExpertForm.transposed``) is a matter of strides: every weight is passed
as its logical ``[E, in, out]`` view, whatever its storage. A fused ``gate_up`` is passed as
two column slices of one tensor.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (that is how CI tests them).
"""

import types
from typing import NamedTuple

import torch
from torch.library import wrap_triton

from ..experts import ExpertForm

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is optional: the module still imports, supports() says no
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=None)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Tuned configs, keyed by shape class.
#
# UNTUNED DEFAULTS: no GPU was available when these were written, so none of them was measured.
# They follow the usual shape of fused-MoE tables (small BLOCK_M when few rows reach each
# expert, so padding stays cheap; wider tiles and deeper pipelines for prefill). Tune them on
# the target card (per dtype and shape class) before trusting the GPU numbers.
#
# The shape class depends only on static sizes (N = T * k' pairs over E experts), never on the
# routing, so picking a config adds no host synchronisation. Under dynamic shapes it guards on
# the class: a compiled graph is reused within a class and recompiled across classes.
# ---------------------------------------------------------------------------------------------

CONFIGS: dict[str, dict[str, int]] = {
    # decode: <= 16 pairs per expert on average
    "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # small batches: <= 64 pairs per expert
    "small": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # prefill
    "prefill": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
}
# The interpreter runs every program in Python: a small BLOCK_M keeps padding work low and
# makes groups larger than one block common in small tests.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
COMBINE_BLOCK_T, COMBINE_BLOCK_H = 16, 128

#: The activations :func:`_activation` implements (a form names its own, ``ExpertForm.activation``;
#: a form whose activation is not here, or that has none, is declined by :func:`supports`).
_ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}


def shape_class(num_pairs: int, num_experts: int) -> str:
    """Which :data:`CONFIGS` entry a layer with ``num_pairs = T * k'`` pairs uses."""
    per_expert = num_pairs // max(num_experts, 1)
    if per_expert <= 16:
        return "decode"
    if per_expert <= 64:
        return "small"
    return "prefill"


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and type(_gate_up_kernel).__name__ == "InterpretedFunction"


def pick_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    if interpreted():
        return dict(INTERPRET_CONFIG)
    return dict(CONFIGS[shape_class(num_pairs, num_experts)])


def supports(form: ExpertForm, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether :func:`moe_experts_triton` handles this form, dtype and device: stacked expert
    parameters, fp32/bf16/fp16, a CUDA device (or a CPU tensor under the interpreter)."""
    if not HAS_TRITON or not form.stacked or dtype not in SUPPORTED_DTYPES:
        return False
    if not form.projections_only or form.activation not in _ACT_IDS:
        return False  # clamped, softcapped, normed, or an activation the kernel lacks: traced
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreted())


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _activation(g, ACT: tl.constexpr):
    # fp32 in, fp32 out; the same functions as forms.ACTIVATIONS
    if ACT == 0:  # silu
        return g * tl.sigmoid(g)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation; tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * z)  # 0.5 * g * (1 + tanh(z)) == g * sigmoid(2z)
    elif ACT == 3:  # relu
        return tl.maximum(g, 0.0)
    else:  # squared relu
        r = tl.maximum(g, 0.0)
        return r * r


@triton.jit
def _gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    bg_ptr,
    bu_ptr,
    h_ptr,
    slot_pair_ptr,
    block_expert_ptr,
    num_pairs,
    k_slots,
    H,
    F,
    num_experts,
    stride_xt,
    stride_xh,
    stride_ge,
    stride_gk,
    stride_gn,
    stride_ue,
    stride_uk,
    stride_un,
    stride_bge,
    stride_bgn,
    stride_bue,
    stride_bun,
    stride_hs,
    stride_hf,
    GATED: tl.constexpr,
    HAS_BIAS_G: tl.constexpr,
    HAS_BIAS_U: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:  # past the used blocks
        return
    e = e.to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slot_pair_ptr + slots)
    row_ok = pair < num_pairs  # padding slots hold num_pairs
    token = (pair // k_slots).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + token[:, None] * stride_xt
    wu_base = wu_ptr + e * stride_ue + cols[None, :] * stride_un
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        wg_base = wg_ptr + e * stride_ge + cols[None, :] * stride_gn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < H
        a = tl.load(
            x_rows + kk[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        wu = tl.load(wu_base + kk[:, None] * stride_uk, mask=w_mask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        if GATED:
            wg = tl.load(wg_base + kk[:, None] * stride_gk, mask=w_mask, other=0.0)
            if DOT_F32:
                wg = wg.to(tl.float32)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)

    if HAS_BIAS_U:
        bu = tl.load(bu_ptr + e * stride_bue + cols * stride_bun, mask=col_ok, other=0.0)
        acc_u += bu.to(tl.float32)[None, :]
    if GATED and HAS_BIAS_G:
        bg = tl.load(bg_ptr + e * stride_bge + cols * stride_bgn, mask=col_ok, other=0.0)
        acc_g += bg.to(tl.float32)[None, :]
    if GATED:
        h = _activation(acc_g, ACT) * acc_u
    else:
        h = _activation(acc_u, ACT)
    h_ptrs = h_ptr + slots.to(tl.int64)[:, None] * stride_hs + cols[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    wd_ptr,
    bd_ptr,
    rw_ptr,
    y_ptr,
    slot_pair_ptr,
    block_expert_ptr,
    num_pairs,
    F,
    H,
    num_experts,
    stride_hs,
    stride_hf,
    stride_de,
    stride_dk,
    stride_dn,
    stride_bde,
    stride_bdn,
    stride_yp,
    stride_yh,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:
        return
    e = e.to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slot_pair_ptr + slots)
    row_ok = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)

    h_rows = h_ptr + slots.to(tl.int64)[:, None] * stride_hs
    wd_base = wd_ptr + e * stride_de + cols[None, :] * stride_dn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < F
        a = tl.load(
            h_rows + kk[None, :] * stride_hf, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            wd_base + kk[:, None] * stride_dk, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        if DOT_F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        b = tl.load(bd_ptr + e * stride_bde + cols * stride_bdn, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    # routing weight of each pair, fused in the epilogue (never read for padding slots)
    rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * stride_yp + cols[None, :] * stride_yh
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    T,
    k_slots,
    H,
    num_experts,
    stride_yp,
    stride_yh,
    stride_ot,
    stride_oh,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    tok64 = tok.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(0, k_slots):
        pair = tok64 * k_slots + j
        eid = tl.load(ids_ptr + pair, mask=tok_ok, other=num_experts)
        keep = tok_ok & (eid < num_experts)  # rows of dropped pairs were never written
        y = tl.load(
            y_ptr + pair[:, None] * stride_yp + cols[None, :] * stride_yh,
            mask=keep[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += y.to(tl.float32)
    o_ptrs = out_ptr + tok64[:, None] * stride_ot + cols[None, :] * stride_oh
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launch prep (torch, traceable: static shapes, no host sync)
# ---------------------------------------------------------------------------------------------


def num_slots(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static size of the padded slot buffer, a whole number of blocks."""
    bound = num_pairs + num_experts * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def align_by_expert(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_pair [S] int32, block_expert [S // block_m] int32)``.

    ``slot_pair[s]`` is the pair index ``t * k' + j`` placed in slot ``s`` (``N`` for padding);
    expert ``e``'s pairs fill the slots from its padded group start, in pair order.
    ``block_expert[b]`` is the expert of block ``b`` (``E`` past the last used block).
    """
    E = num_experts
    flat = ids.reshape(-1)
    N = flat.numel()
    S = num_slots(N, E, block_m)
    dev = flat.device
    sorted_ids, order = torch.sort(flat, stable=True)  # sentinel E sorts last
    experts = torch.arange(E, device=dev, dtype=sorted_ids.dtype)
    start = torch.searchsorted(sorted_ids, experts)  # first sorted position of each expert
    counts = torch.searchsorted(sorted_ids, experts, right=True) - start
    padded = (counts + (block_m - 1)) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    block_start = torch.arange(0, S, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)  # in [0, E]
    slot_expert = block_expert[:, None].expand(-1, block_m).reshape(-1)
    e = slot_expert.clamp_max(E - 1)
    rank = torch.arange(S, device=dev) - pad_start[e]
    keep = (slot_expert < E) & (rank < counts[e])
    src = (start[e] + rank).clamp(0, max(N - 1, 0))
    slot_pair = torch.where(keep, order[src], N)
    return slot_pair.to(torch.int32), block_expert.to(torch.int32)


def _logical(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Weight as its [E, in, out] view (nn.Linear storage is [E, out, in]): strides only."""
    return w if transposed else w.transpose(1, 2)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 only where torch allows it for matmuls
    (the reference is exact fp32 otherwise). Other dtypes ignore it; ``ieee`` is valid on
    every backend."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if t is None else t  # a pointer argument the kernel never reads


def _bias_strides(b: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if b is None else (b.stride(0), b.stride(1))


class _Operands(NamedTuple):
    """An expert form's parameters as kernel operands: every weight as its logical
    ``[E, in, out]`` view, the biases (``None`` where the form has none) and the experts'
    intermediate width ``F``. A fused ``gate_up`` becomes two column slices; without a gate,
    ``wg`` is ``wu`` (never read)."""

    wg: torch.Tensor
    wu: torch.Tensor
    bg: torch.Tensor | None
    bu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    F: int


def _operands(f: ExpertForm, p: dict[str, torch.Tensor]) -> _Operands:
    """The kernel operands of form ``f`` with parameters ``p`` (by role): views only."""
    bg = bu = None
    if "gate_up" in f.roles:
        wgu = _logical(p["gate_up"], "gate_up" in f.transposed)
        Fd = wgu.shape[2] // 2
        first, second = wgu[:, :, :Fd], wgu[:, :, Fd:]
        wg, wu = (first, second) if f.gate_first else (second, first)
        b = p.get("b_gate_up")
        if b is not None:
            bg, bu = (b[:, :Fd], b[:, Fd:]) if f.gate_first else (b[:, Fd:], b[:, :Fd])
    elif "gate" in f.roles:
        wg = _logical(p["gate"], "gate" in f.transposed)
        wu = _logical(p["up"], "up" in f.transposed)
        Fd = wu.shape[2]
        bg, bu = p.get("b_gate"), p.get("b_up")
    else:
        wu = _logical(p["up"], "up" in f.transposed)
        wg = wu  # never read
        Fd = wu.shape[2]
        bu = p.get("b_up")
    wd = _logical(p["down"], "down" in f.transposed)
    return _Operands(wg, wu, bg, bu, wd, p.get("b_down"), Fd)


class _Slots(NamedTuple):
    """What the two GEMM launches share: the slot layout of :func:`align_by_expert`, the
    sizes, the tile config and how ``tl.dot`` runs."""

    slot_pair: torch.Tensor
    block_expert: torch.Tensor
    num_pairs: int
    num_experts: int
    cfg: dict[str, int]
    precision: str
    dot_f32: bool

    def tiles(self) -> dict[str, int]:
        """The block sizes and launch options, as kernel keyword arguments."""
        c = self.cfg
        return dict(
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )  # fmt: skip

    def grid(self, cols: int) -> tuple[int, int]:
        """One program per block of slots and per ``BLOCK_N`` output columns."""
        return (
            self.slot_pair.shape[0] // self.cfg["BLOCK_M"],
            triton.cdiv(cols, self.cfg["BLOCK_N"]),
        )


# wrap_triton makes each launch visible to make_fx / Inductor (a triton_kernel_wrapper node);
# in eager, triton_op turns it off and the kernels launch directly.


def _launch_gate_up(
    x: torch.Tensor, w: _Operands, f: ExpertForm, k_slots: int, s: _Slots
) -> torch.Tensor:
    """Step 2: ``h [slots, F]``, the activation of each slot's token row (see the module
    docstring)."""
    h = torch.empty(s.slot_pair.shape[0], w.F, dtype=x.dtype, device=x.device)
    wg, wu, bg, bu = w.wg, w.wu, w.bg, w.bu
    wrap_triton(_gate_up_kernel)[s.grid(w.F)](
        x, wg, wu, _or(bg, wu), _or(bu, wu), h, s.slot_pair, s.block_expert,
        s.num_pairs, k_slots, x.shape[1], w.F, s.num_experts,
        x.stride(0), x.stride(1),
        wg.stride(0), wg.stride(1), wg.stride(2),
        wu.stride(0), wu.stride(1), wu.stride(2),
        *_bias_strides(bg), *_bias_strides(bu),
        h.stride(0), h.stride(1),
        GATED=f.gated, HAS_BIAS_G=bg is not None, HAS_BIAS_U=bu is not None,
        ACT=_ACT_IDS[f.activation], PRECISION=s.precision, DOT_F32=s.dot_f32, **s.tiles(),
    )  # fmt: skip
    return h


def _launch_down(
    h: torch.Tensor, w: _Operands, rw: torch.Tensor, H: int, s: _Slots
) -> torch.Tensor:
    """Step 3: ``y [N, H]``, each pair's expert output times its routing weight ``rw``."""
    y = torch.empty(s.num_pairs, H, dtype=h.dtype, device=h.device)
    wd, bd = w.wd, w.bd
    wrap_triton(_down_kernel)[s.grid(H)](
        h, wd, _or(bd, wd), rw, y, s.slot_pair, s.block_expert,
        s.num_pairs, w.F, H, s.num_experts,
        h.stride(0), h.stride(1),
        wd.stride(0), wd.stride(1), wd.stride(2),
        *_bias_strides(bd),
        y.stride(0), y.stride(1),
        HAS_BIAS=bd is not None, PRECISION=s.precision, DOT_F32=s.dot_f32, **s.tiles(),
    )  # fmt: skip
    return y


def _launch_combine(y: torch.Tensor, ids: torch.Tensor, T: int, E: int) -> torch.Tensor:
    """Step 4: ``out [T, H]``, the sum of each token's kept rows of ``y``."""
    k_slots, H = ids.shape[1], y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    grid = (triton.cdiv(T, COMBINE_BLOCK_T), triton.cdiv(H, COMBINE_BLOCK_H))
    wrap_triton(_combine_kernel)[grid](
        y, ids, out,
        T, k_slots, H, E,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=COMBINE_BLOCK_T, BLOCK_H=COMBINE_BLOCK_H, num_warps=4,
    )  # fmt: skip
    return out


def _impl(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: str,
) -> torch.Tensor:
    f = ExpertForm.from_str(form)
    p = dict(zip(f.roles, params, strict=True))
    T, H = x.shape
    k_slots = ids.shape[1]
    E = params[0].shape[0]
    N = T * k_slots
    if N == 0:
        return x.new_zeros(T, H)
    cfg = pick_config(N, E)
    prec = _precision(x.dtype)
    # Triton's interpreter multiplies the raw bit patterns in a bf16 tl.dot (it stores bf16 as
    # uint16; triton-lang/triton#11584, "not supported yet"): there, the operands go to fp32
    # first, which gives the same products as the GPU's bf16 dot with an fp32 accumulator.
    dot_f32 = interpreted() and x.dtype == torch.bfloat16

    ids = ids.contiguous()
    rw = weights.contiguous().reshape(-1)
    slot_pair, block_expert = align_by_expert(ids, E, cfg["BLOCK_M"])
    s = _Slots(slot_pair, block_expert, N, E, cfg, prec, dot_f32)
    w = _operands(f, p)
    h = _launch_gate_up(x, w, f, k_slots, s)
    y = _launch_down(h, w, rw, H, s)
    return _launch_combine(y, ids, T, E)


if HAS_TRITON:
    triton_moe_experts = torch.library.triton_op("capmoe::triton_moe_experts", mutates_args=())(
        _impl
    )
else:
    triton_moe_experts = None


def moe_experts_triton(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: ExpertForm | str,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``; sentinel ids skipped.

    Same signature and semantics as ``grouped.moe_experts_grouped``. Check :func:`supports`
    first. ``form`` may be given as its string.
    """
    if triton_moe_experts is None:
        raise RuntimeError("moe_experts_triton needs triton")
    if any(p.dtype != x.dtype for p in params):
        # tl.dot wants both operands of one dtype; casting the experts per call would copy them
        raise TypeError(f"expert parameters must have the hidden states' dtype {x.dtype}")
    s = form if isinstance(form, str) else form.to_str()
    return triton_moe_experts(x, ids, weights, list(params), s)


__all__ = [
    "CONFIGS",
    "align_by_expert",
    "moe_experts_triton",
    "pick_config",
    "supports",
    "triton_moe_experts",
]
