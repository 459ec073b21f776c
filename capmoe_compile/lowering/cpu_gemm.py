"""A few-row fp32 GEMM for the CPU experts op: ``y = x @ w.T`` with ``w`` as stored ``[out, in]``.

Why: with one intra-op thread, MKL's ``sgemm`` against a large weight it has to treat as
transposed (nn.Linear's ``[out, in]``) costs far more than the weight's bytes when only a few
rows multiply it: it packs the weight on every call. Measured on this project's machine (AMD
EPYC, AVX2, one thread, thread CPU time, ``benchmarks/layer_probes.py small-m``): a
``[16, 1024] x [1024, 4096]`` product 8.6 ms with ``torch.mm``, 3.6 ms here; the decode
layer's down projection ``[10, 2048] x [2048, 1024]`` 1.9 vs 0.9 ms; a fine-grained expert's
``[11, 1024] x [1024, 32]`` 26 vs 13 us (MKL's per-call setup). With more rows MKL's
blocked kernel catches up (from ~20 rows of a 2 MB weight, ~128 of a 16 MB one:
:func:`max_rows`), and with a tiny reduction (``in`` = 16) the per-dot horizontal sums
dominate here: the caller uses this only for few rows (:func:`max_rows`) and ``in >= 256``.

The kernel reads ``w`` where it lies (no packed copy, nothing cached, nothing to invalidate):
each output ``y[m, n]`` is one dot product over ``in``, computed 8 lanes wide with FMA and
summed across lanes at the end; 3 rows x 4 weight rows are computed together (12 accumulators)
so each weight row, loaded once from memory, is reused from L1 by every row block, and the
next 4 weight rows are prefetched meanwhile (10-40% faster at 2-16 rows than without; into
L2, not L1, on AVX-512 CPUs: :data:`PREFETCH_HINT`). Its
arithmetic per element does not depend on ``M`` or on a row's position (the same chain over
``in`` for every ``(m, n)``), so results do not depend on batch composition; they differ from
``torch.mm`` by fp32 reassociation only.

Compiled once through Inductor's C++ code cache (the same compiler and cache directory as
Inductor's own CPU kernels; a few seconds the first time, loaded from the cache after that).
Only on x86-64 CPUs where ATen itself dispatches AVX2 or AVX-512 (which imply FMA); anywhere
else, or if the compile fails, :func:`kernel` returns ``None`` and the caller keeps
``torch.mm``. ``CAPMOE_CPU_GEMM=0`` in the environment turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
import warnings

import torch

#: Most rows of one product computed here, by the weight's shape (:func:`max_rows`). MKL
#: packs the weight on every call, which costs less the smaller the weight is, and its blocked
#: kernel computes each row faster: the kernel wins up to more rows the larger the weight.
#: Measured (one thread, thread time, interleaved medians, load 2-3, ``torch.mm`` time over
#: the kernel's; [out, in] weights): 1024x256 1.16 / 0.86 at 8 / 16 rows; 1024x512 1.05 / 0.99
#: / 0.77 at 16 / 24 / 32; 1024x768 1.02 / 0.99 / 0.90 at 16 / 24 / 32; 512x1024 1.14 / 0.86 at
#: 32 / 48; 768x1024 1.00 / 0.96 at 32 / 48; 1024x1024 1.07 / 0.86 at 64 / 96; 1536x1024 1.05
#: / 1.00 at 64 / 96; 1024x2048 1.00 / 0.96 at 64 / 96; 4096x1024 1.14 / 1.00 / 0.90 at 96 /
#: 128 / 192. With few rows the kernel is 1.2-3x faster (``layer_probes small-m``).
MAX_ROWS_SHORT_IN = 16  # in < 1024
MAX_ROWS = 32  # in >= 1024, weight < 1 Mi elements
MAX_ROWS_MID = 64  # weight < 4 Mi elements
MAX_ROWS_BIG = 96  # weight >= 4 Mi elements


#: Most rows of one bf16 product computed by :func:`kernel_bf16`. First measured with one
#: weight, hot in cache (AMD EPYC Zen 4, AVX-512 bf16, no AMX, one thread, thread time,
#: interleaved medians of 7, load 12-16; ``torch.mm`` (oneDNN) time over the kernel's, weights
#: [out, in]): 4096x1024 3.33 / 2.58 / 1.17 / 0.58 at 1 / 2 / 4 / 8 rows; 1024x2048 5.27 /
#: 2.15 / 1.26 / 0.85; 1024x1024 6.48 / 2.22 / 1.39 / 0.80; 1024x512 6.85 / 2.63 / 1.67 / 0.98.
#: An MoE layer reads each expert's weight from memory once per call: measured that way
#: (``python -m benchmarks.cpu_gemm_ab``: 8 distinct weights per timed call, the kernel with
#: :data:`PREFETCH_HINT` T1; same machine, load 13-15), the kernel is faster up to 8 rows:
#: oneDNN / kernel 4096x1024 1.87 / 1.71 / 1.54 / 1.08 at 1 / 2 / 4 / 8 rows, 1024x2048 2.09
#: / 1.68 / 1.44 / 1.02; about equal at 10 rows (0.98 / 0.95), slower from 15 (0.73-0.81).
MAX_ROWS_BF16 = 8

#: Where the kernels prefetch the next weight block: ``_MM_HINT_T1`` (into L2) on CPUs where
#: ATen dispatches AVX-512, ``_MM_HINT_T0`` (L1) elsewhere (AVX2: what the fp32 kernel was
#: measured with). Measured on Zen 4 (``python -m benchmarks.cpu_gemm_ab``: one thread, 8
#: distinct weights per timed call so each streams from memory, interleaved, per-round
#: medians of 9, load 13-15; T0 time over T1): fp32 4096x1024 1.36 / 1.29 / 1.49 / 1.28 /
#: 1.11 / 1.06 / 1.04 at 1 / 2 / 4 / 8 / 10 / 15 / 24 rows, 1024x2048 1.12 / 1.17 / 1.37 /
#: 1.41 / 1.18 / 1.14 / 1.13; bf16 4096x1024 1.58 / 1.51 / 1.17 / 1.02 at 1 / 2 / 4 / 8 rows,
#: 1024x2048 1.38 / 1.14 / 1.28 / 1.00; the decode layer's experts op 1.13x in both. (An L1
#: prefetch holds one of the core's few L1 miss buffers until the line arrives; an L2
#: prefetch does not, so more of the weight's lines are in flight.) Not measured on Intel.
PREFETCH_HINT = "T1"


def max_rows(n_out: int, n_in: int) -> int:
    """Most rows of a product with an ``[n_out, n_in]`` weight that the kernel computes."""
    if n_in < 1024:
        return MAX_ROWS_SHORT_IN
    size = n_out * n_in
    return MAX_ROWS if size < 1 << 20 else (MAX_ROWS_MID if size < 4 << 20 else MAX_ROWS_BIG)


#: Fewest ``in`` elements (the reduction) computed here: at ``in`` = 16 the horizontal sums
#: cost more than MKL's setup (``[64, 16] x [16, 1024]``: 123 vs 52 us).
MIN_IN = 256


_SRC = r"""
#include <immintrin.h>
#include <stdint.h>

#define T_AVX2 __attribute__((target("avx2,fma")))
#ifndef CAPMOE_PF_HINT
#define CAPMOE_PF_HINT _MM_HINT_T0
#endif

extern "C" {

T_AVX2 static inline float capmoe_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[i, j] = sum_k x[i, k] * w[j, k] for i < MB, j < NB; the tail k >= K8 in scalar code.
// Meanwhile ``np`` rows pf, pf + ps, ... (of the next weight block) are prefetched
// (CAPMOE_PF_HINT: L1 or L2, see PREFETCH_HINT).
#define CAPMOE_BLOCK(MB, NB)                                                                 \
  T_AVX2 static void capmoe_blk_##MB##_##NB(const float* x, int64_t ldx, const float* w,    \
                                            int64_t ldw, float* y, int64_t ldy, int64_t K,  \
                                            const float* pf, int64_t ps, int np) {          \
    __m256 acc[MB][NB];                                                                      \
    for (int i = 0; i < MB; i++)                                                             \
      for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();                          \
    const int64_t K8 = K - K % 8;                                                            \
    for (int64_t k = 0; k < K8; k += 8) {                                                    \
      if (np && (k & 15) == 0) /* one 64-byte line per row every other step */               \
        for (int r = 0; r < np; r++) _mm_prefetch((const char*)(pf + r * ps + k), CAPMOE_PF_HINT); \
      __m256 wv[NB];                                                                         \
      for (int j = 0; j < NB; j++) wv[j] = _mm256_loadu_ps(w + j * ldw + k);                 \
      for (int i = 0; i < MB; i++) {                                                         \
        __m256 xv = _mm256_loadu_ps(x + i * ldx + k);                                        \
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);      \
      }                                                                                      \
    }                                                                                        \
    for (int i = 0; i < MB; i++)                                                             \
      for (int j = 0; j < NB; j++) {                                                         \
        float s = capmoe_hsum(acc[i][j]);                                                    \
        for (int64_t k = K8; k < K; k++) s += x[i * ldx + k] * w[j * ldw + k];               \
        y[i * ldy + j] = s;                                                                  \
      }                                                                                      \
  }

CAPMOE_BLOCK(1, 4) CAPMOE_BLOCK(2, 4) CAPMOE_BLOCK(3, 4)
CAPMOE_BLOCK(1, 1) CAPMOE_BLOCK(2, 1) CAPMOE_BLOCK(3, 1)

typedef void (*capmoe_blk)(const float*, int64_t, const float*, int64_t, float*, int64_t,
                           int64_t, const float*, int64_t, int);

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ w [N, K] (row stride ldw)^T.
// Blocks of 4 weight rows, each used by every block of 3 rows while it sits in L1; the next
// block's 4 weight rows are prefetched spread over the row blocks (row block i fetches rows
// i, i + nmb, ... of it), so the weight's stream from memory overlaps the arithmetic.
T_AVX2 void capmoe_gemm_nt_f32(const float* x, int64_t ldx, const float* w, int64_t ldw,
                               float* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  static const capmoe_blk wide[4] = {0, capmoe_blk_1_4, capmoe_blk_2_4, capmoe_blk_3_4};
  static const capmoe_blk one[4] = {0, capmoe_blk_1_1, capmoe_blk_2_1, capmoe_blk_3_1};
  const int64_t nmb = (M + 2) / 3;
  int64_t n = 0;
  for (; n + 4 <= N; n += 4)
    for (int64_t m = 0, i = 0; m < M; m += 3, i++) {
      const int64_t mb = M - m < 3 ? M - m : 3;
      const int np = (n + 8 <= N && i < 4) ? (int)((4 - i + nmb - 1) / nmb) : 0;
      wide[mb](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K,
               w + (n + 4 + i) * ldw, nmb * ldw, np);
    }
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m += 3) {
      const int64_t mb = M - m < 3 ? M - m : 3;
      one[mb](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, 0, 0, 0);
    }
}

}  // extern "C"
"""

#: The bf16 few-row kernel (``capmoe_gemm_nt_bf16``): ``y = x @ w.T`` with ``x``, ``w`` and
#: ``y`` in bf16, products and sums in fp32 (``vdpbf16ps``: each bf16 pair multiplied exactly
#: and added into fp32 lanes, 32 elements of ``in`` per instruction), each ``y`` rounded once
#: to bf16 (nearest even), as ATen's bf16 GEMM rounds its fp32 accumulator. Only on CPUs with
#: AVX-512 bf16 (``torch.cpu._is_avx512_bf16_supported()``: Zen 4, Cooper Lake, Sapphire
#: Rapids and later). The same blocking as the fp32 kernel: 3 rows x 4 weight rows, the next
#: 4 weight rows prefetched; the tail of ``in`` (< 32) through masked loads (zeros past it).
#: ``vdpbf16ps`` treats bf16 denormal inputs as zero: ``y`` may differ from an exact fp32 sum
#: there by less than bf16's own rounding.
_SRC_BF16 = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define T_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#ifndef CAPMOE_PF_HINT
#define CAPMOE_PF_HINT _MM_HINT_T0
#endif

extern "C" {

T_BF16 static inline uint16_t capmoe_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}

#define CAPMOE_BLOCK16(MB, NB)                                                               \
  T_BF16 static void capmoe_b16_##MB##_##NB(const uint16_t* x, int64_t ldx, const uint16_t* w,\
                                            int64_t ldw, uint16_t* y, int64_t ldy, int64_t K, \
                                            const uint16_t* pf, int64_t ps, int np) {        \
    __m512 acc[MB][NB];                                                                      \
    for (int i = 0; i < MB; i++)                                                             \
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();                          \
    for (int64_t k = 0; k < K; k += 32) {                                                    \
      const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu                               \
                                       : (__mmask32)((1u << (K - k)) - 1u);                  \
      if (np && (k & 31) == 0)                                                               \
        for (int r = 0; r < np; r++) _mm_prefetch((const char*)(pf + r * ps + k), CAPMOE_PF_HINT); \
      __m512i wv[NB];                                                                        \
      for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_epi16(m, w + j * ldw + k);     \
      for (int i = 0; i < MB; i++) {                                                         \
        __m512i xv = _mm512_maskz_loadu_epi16(m, x + i * ldx + k);                           \
        for (int j = 0; j < NB; j++)                                                         \
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);            \
      }                                                                                      \
    }                                                                                        \
    for (int i = 0; i < MB; i++)                                                             \
      for (int j = 0; j < NB; j++) y[i * ldy + j] = capmoe_to_bf16(_mm512_reduce_add_ps(acc[i][j])); \
  }

CAPMOE_BLOCK16(1, 4) CAPMOE_BLOCK16(2, 4) CAPMOE_BLOCK16(3, 4)
CAPMOE_BLOCK16(1, 1) CAPMOE_BLOCK16(2, 1) CAPMOE_BLOCK16(3, 1)

typedef void (*capmoe_b16)(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*,
                           int64_t, int64_t, const uint16_t*, int64_t, int);

// y [M, N] = x [M, K] @ w [N, K]^T, all bf16 (row strides in elements), fp32 sums.
T_BF16 void capmoe_gemm_nt_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                                uint16_t* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  static const capmoe_b16 wide[4] = {0, capmoe_b16_1_4, capmoe_b16_2_4, capmoe_b16_3_4};
  static const capmoe_b16 one[4] = {0, capmoe_b16_1_1, capmoe_b16_2_1, capmoe_b16_3_1};
  const int64_t nmb = (M + 2) / 3;
  int64_t n = 0;
  for (; n + 4 <= N; n += 4)
    for (int64_t m = 0, i = 0; m < M; m += 3, i++) {
      const int64_t mb = M - m < 3 ? M - m : 3;
      const int np = (n + 8 <= N && i < 4) ? (int)((4 - i + nmb - 1) / nmb) : 0;
      wide[mb](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K,
               w + (n + 4 + i) * ldw, nmb * ldw, np);
    }
  for (; n < N; n++)
    for (int64_t m = 0; m < M; m += 3) {
      const int64_t mb = M - m < 3 ? M - m : 3;
      one[mb](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, 0, 0, 0);
    }
}

}  // extern "C"
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _with_hint(src: str, hint: str) -> str:
    """``src`` with its prefetches' hint set (``"T0"``: L1, ``"T1"``: L2)."""
    return f"#define CAPMOE_PF_HINT _MM_HINT_{hint}\n" + src


def _hint() -> str:
    """:data:`PREFETCH_HINT` where ATen dispatches AVX-512 (where it was measured), else T0."""
    return PREFETCH_HINT if torch.backends.cpu.get_cpu_capability() == "AVX512" else "T0"


def _bf16_cpu() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:
        return False


def kernel_bf16():
    """The compiled ``capmoe_gemm_nt_bf16`` (ctypes; arguments as :func:`kernel`'s, strides
    in elements), or ``None``: no AVX-512 bf16, ``CAPMOE_CPU_GEMM=0`` or
    ``CAPMOE_CPU_GEMM_BF16=0``, or the compile failed (warned once)."""
    fn = _state.get("bf16", False)
    if fn is not False:
        return fn
    with _lock:
        if "bf16" in _state:
            return _state["bf16"]
        fn = None
        on = os.environ.get("CAPMOE_CPU_GEMM", "1") != "0"
        if on and os.environ.get("CAPMOE_CPU_GEMM_BF16", "1") != "0" and _bf16_cpu():
            try:
                from torch._inductor.codecache import CppCodeCache

                fn = CppCodeCache.load(_with_hint(_SRC_BF16, _hint())).capmoe_gemm_nt_bf16
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64] * 3
                fn.restype = None
            except Exception as e:
                warnings.warn(f"capmoe: CPU bf16 few-row kernel unavailable ({e!r})", stacklevel=2)
                fn = None
        _state["bf16"] = fn
        return fn


def _supported_cpu() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


def kernel():
    """The compiled ``capmoe_gemm_nt_f32`` (a ctypes function), or ``None`` where it is not
    available (not x86-64 with AVX2, ``CAPMOE_CPU_GEMM=0``, or the compile failed: warned
    once)."""
    fn = _state.get("fn", False)
    if fn is not False:
        return fn
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("CAPMOE_CPU_GEMM", "1") != "0" and _supported_cpu():
            try:
                from torch._inductor.codecache import CppCodeCache

                fn = CppCodeCache.load(_with_hint(_SRC, _hint())).capmoe_gemm_nt_f32
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64] * 3
                fn.restype = None
            except Exception as e:  # no compiler, unexpected toolchain: keep torch.mm
                warnings.warn(f"capmoe: CPU few-row GEMM kernel unavailable ({e!r})", stacklevel=2)
                fn = None
        _state["fn"] = fn
        return fn


@contextlib.contextmanager
def disabled():
    """Within this block :func:`kernel` returns ``None`` (the experts op uses ``torch.mm``):
    for A/B measurements in one process (``benchmarks/layer_probes.py kernel-ab``)."""
    kernel()
    kernel_bf16()
    saved = _state["fn"], _state["bf16"]
    _state["fn"] = _state["bf16"] = None
    try:
        yield
    finally:
        _state["fn"], _state["bf16"] = saved


def mm_nt(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, fn) -> torch.Tensor:
    """``out = x @ w.T`` with the kernel ``fn`` (from :func:`kernel`, or :func:`kernel_bf16`
    for bf16): ``x`` [M, K], ``w`` [N, K], ``out`` [M, N], all fp32 (all bf16) on the CPU with
    unit stride along their last dim (rows may be strided). The caller checks these
    (:func:`fits`)."""
    M, K = x.shape
    fn(
        x.data_ptr(),
        x.stride(0),
        w.data_ptr(),
        w.stride(0),
        out.data_ptr(),
        out.stride(0),
        M,
        w.shape[0],
        K,
    )
    return out


def fits(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`mm_nt` may compute ``out = x @ w.T`` (dtypes, layouts, shapes); for
    bf16 the caller also needs :func:`kernel_bf16`."""
    return (
        x.dtype == w.dtype == out.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == w.dim() == out.dim() == 2
        and x.shape[1] == w.shape[1]
        and out.shape == (x.shape[0], w.shape[0])
        and x.stride(1) == 1
        and w.stride(1) == 1
        and out.stride(1) == 1
        and x.device.type == w.device.type == out.device.type == "cpu"
    )
