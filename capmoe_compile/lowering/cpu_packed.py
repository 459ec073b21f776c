"""Packed expert weights for the CPU experts op's few-row products, under a frozen-weights contract.

Why: ``cpu_gemm``'s kernels read an ``[out, in]`` weight where it lies, so each output is one
dot product along ``in``, summed across vector lanes at the end (one horizontal sum, and in
bf16 one rounding, per output). At 10-15 rows that reduction costs about as much as the dot
products and the kernel reaches half the ``mm`` rate, where a decode layer's hot experts are
compute-bound (docs/performance.md, targets 2 and 4). Repacked so that 16 consecutive outputs
of one ``in`` index are one 64-byte vector, each output stays in one lane from the first
product to the store: ``acc[i][j] += x[i, k] * W[k, 16j : 16j + 16]``, a broadcast and a fused
multiply-add per 16 outputs, no reduction, and the weight read as one sequential stream.

Layout (:func:`pack`), per expert: the ``out`` dimension in blocks of 64 (the last one 16, 32,
48 or 64 wide), each block ``[in, width]`` row-major (fp32), or ``[in / 2, width, 2]`` in bf16
(``vdpbf16ps`` multiplies a pair of ``in`` elements per lane); block ``b`` starts at element
``64 * b * in``. Needs ``out % 16 == 0`` (and ``in`` even in bf16); other weights keep
``cpu_gemm``.

The contract (``capmoe_compile.freeze_experts``): the packed copy is made from a weight the
user declared frozen for inference, on its first use by the op (one more copy of those
weights in memory), and kept while the weight lives. Before every use the weight's version
counter, address and shape are compared with those it was packed from: an in-place update
(``copy_``, ``load_state_dict``, an optimizer step, ``param.data = ...``) is seen and the
weight repacked on the next call; nothing stale is ever multiplied. Weights created under
``torch.inference_mode`` have no version counter: ``freeze_experts`` refuses them (a
``ValueError``), since an update of them could not be seen. ``thaw_experts`` frees the copies.

Arithmetic: fp32 sums run in ``in`` order, one fused multiply-add per element (a chain that
does not depend on the number of rows or a row's position, as ``cpu_gemm``'s); bf16 products
and sums in fp32 (``vdpbf16ps``: pairs of ``in``; bf16 denormal inputs read as zero), each
output rounded once to bf16, nearest even, as ATen's bf16 GEMM rounds its accumulator. Results
differ from ``torch.mm`` and from ``cpu_gemm`` by fp32 reassociation only.

Kernels: 6 rows x 64 outputs at a time (24 accumulators in AVX-512's 32 registers), each
column block in chunks of 512 steps of ``in``, every row block reading the chunk again from
L2; with two or more row blocks the next chunk is prefetched into L2 meanwhile. With one row
block (up to 6 rows) nothing is prefetched: the hardware follows the one sequential stream,
and a software prefetch one chunk ahead was slower at 1-4 rows in an A/B on Zen 4 (one
thread; a throwaway script, not kept, so no figure is given here). Only on CPUs where ATen dispatches AVX-512 (fp32)
or that have AVX-512 bf16 (bf16); ``CAPMOE_CPU_PACKED=0`` turns both off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
import weakref

import torch

from . import cpu_gemm

#: Width of one block of outputs (4 vectors of 16 fp32 lanes).
BLOCK = 64

#: Most rows of one product computed with a packed weight, by dtype (``cpu_experts`` cuts
#: larger groups into chunks of this size when every projection is packed, else uses
#: ``torch.mm`` above it). ``python -m benchmarks.packed_ab``
#: (``benchmarks/results/packed_ab_avx512_2026-12-06.json``: AMD EPYC Zen 4, AVX-512 + AVX-512
#: bf16, no AMX, one thread, 8 streamed weights per timed call, interleaved, load 0.2-0.6;
#: ``torch.mm`` time over the packed kernel's): fp32 (MKL) 1.22-1.33x at 128 rows, 1.15-1.26x
#: at 256, 1.11-1.19x at 512 (``--rows 1024,2048 --dtypes fp32 --reps 3``, not recorded, load
#: 0.7-1.7: 1.11-1.22x at 1024, 1.12-1.16x at 2048); bf16
#: (oneDNN) 1.05-1.08x at 128, 0.95-1.02x at 256, 0.92-1.00x at 512.
MAX_ROWS = {torch.float32: 1024, torch.bfloat16: 128}

_SRC = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define T_F32 __attribute__((target("avx512f")))
#define T_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

static inline uint16_t capmoe_to_bf16_(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}

// One micro-kernel call: rows i < MB, outputs 16j + l for j < NV, over `steps` k steps of one
// packed block chunk `w` (fp32: rows of NV * 16 outputs; bf16: rows of NV * 16 pairs).
// The fp32 sums start from zero (`init` false) or from s[i, :] and end in s (row stride lds);
// with `out` (bf16 only; row stride ldo) they are rounded to bf16 into out instead. Meanwhile `pfn` 64-byte
// lines per step are prefetched into L2 from `pf`.
template <int MB, int NV>
T_F32 static void pk_f32(const float* x, int64_t ldx, const float* w, int64_t steps,
                         float* s, int64_t lds, bool init, uint16_t*, int64_t, const char* pf,
                         int pfn) {
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NV; j++)
      acc[i][j] = init ? _mm512_loadu_ps(s + i * lds + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < steps; k++) {
    const float* wk = w + k * (NV * 16);
    for (int r = 0; r < pfn; r++) _mm_prefetch(pf + (k * pfn + r) * 64, _MM_HINT_T1);
    __m512 wv[NV];
    for (int j = 0; j < NV; j++) wv[j] = _mm512_loadu_ps(wk + 16 * j);
    for (int i = 0; i < MB; i++) {
      const __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
      for (int j = 0; j < NV; j++) acc[i][j] = _mm512_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NV; j++) _mm512_storeu_ps(s + i * lds + 16 * j, acc[i][j]);
}

template <int MB, int NV>
T_BF16 static void pk_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t steps,
                           float* s, int64_t lds, bool init, uint16_t* out, int64_t ldo,
                           const char* pf, int pfn) {
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NV; j++)
      acc[i][j] = init ? _mm512_loadu_ps(s + i * lds + 16 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < steps; p++) {
    const uint16_t* wp = w + p * (NV * 32);
    for (int r = 0; r < pfn; r++) _mm_prefetch(pf + (p * pfn + r) * 64, _MM_HINT_T1);
    __m512i wv[NV];
    for (int j = 0; j < NV; j++) wv[j] = _mm512_loadu_si512((const void*)(wp + 32 * j));
    for (int i = 0; i < MB; i++) {
      int32_t pair;  // (x[i, 2p], x[i, 2p + 1]) in one 32-bit lane
      memcpy(&pair, x + i * ldx + 2 * p, 4);
      const __m512i xb = _mm512_set1_epi32(pair);
      for (int j = 0; j < NV; j++)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xb, (__m512bh)wv[j]);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NV; j++) {
      if (!out) {
        _mm512_storeu_ps(s + i * lds + 16 * j, acc[i][j]);
        continue;
      }
      float tmp[16];
      _mm512_storeu_ps(tmp, acc[i][j]);
      for (int l = 0; l < 16; l++) out[i * ldo + 16 * j + l] = capmoe_to_bf16_(tmp[l]);
    }
}

template <typename T>
using capmoe_pk = void (*)(const T*, int64_t, const T*, int64_t, float*, int64_t, bool,
                           uint16_t*, int64_t, const char*, int);
#define CAPMOE_ROW(F, MB) {0, F<MB, 1>, F<MB, 2>, F<MB, 3>, F<MB, 4>}
#define CAPMOE_TABLE(F, T)                                                            \
  static const capmoe_pk<T> F##_table[7][5] = {                                       \
      {0, 0, 0, 0, 0},    CAPMOE_ROW(F, 1), CAPMOE_ROW(F, 2), CAPMOE_ROW(F, 3),       \
      CAPMOE_ROW(F, 4),   CAPMOE_ROW(F, 5), CAPMOE_ROW(F, 6)};
CAPMOE_TABLE(pk_f32, float)
CAPMOE_TABLE(pk_bf16, uint16_t)

// Steps of one chunk: 512 k steps (fp32: 128 KiB of a 64-wide block; bf16: 512 pairs, the same
// bytes), so a chunk and the next one sit in L2 together whatever `in` is.
static const int64_t CAPMOE_KC = 512;

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W^T, W packed (module docstring).
// Column blocks in order, each in chunks along k, each chunk read by every row block (rows in
// balanced blocks of at most 6): in this order the packed weight is one sequential stream.
// With two or more row blocks the next chunk is prefetched meanwhile, spread over them.
// fp32 sums are kept in y between chunks (exact), bf16 ones in an fp32 scratch.
template <typename T, int DIV>
static void capmoe_packed(const capmoe_pk<T> (*table)[5], const T* x, int64_t ldx,
                          const T* wp, T* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  const bool f32 = DIV == 1;
  const int64_t nrb = (M + 5) / 6, base = M / nrb, extra = M % nrb, steps_all = K / DIV;
  float* s = f32 ? (float*)y : (float*)malloc(sizeof(float) * M * 64);
  const int64_t lds = f32 ? ldy : 64;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int nv = (int)((N - n0 < 64 ? N - n0 : 64) / 16);
    for (int64_t c = 0; c < steps_all; c += CAPMOE_KC) {
      const int64_t steps = steps_all - c < CAPMOE_KC ? steps_all - c : CAPMOE_KC;
      const T* w = wp + n0 * K + c * DIV * nv * 16;
      const char* next = (const char*)(w + steps * DIV * nv * 16);
      const int64_t lines = CAPMOE_KC * 4;  // next chunk's lines, at most (64 B * 4 per step)
      const int pfn = nrb > 1 ? (int)((lines + nrb * steps - 1) / (nrb * steps)) : 0;
      const bool last = c + steps == steps_all;
      for (int64_t r = 0, m = 0; r < nrb; r++) {
        const int mb = (int)(base + (r < extra));
        uint16_t* out = (!f32 && last) ? (uint16_t*)(y + m * ldy + n0) : nullptr;
        table[mb][nv](x + m * ldx + c * DIV, ldx, w, steps, s + (f32 ? m * lds + n0 : m * lds),
                      lds, c > 0, out, ldy, next + r * steps * pfn * 64, pfn);
        m += mb;
      }
    }
  }
  if (!f32) free(s);
}

extern "C" T_F32 void capmoe_gemm_packed_f32(const float* x, int64_t ldx, const float* wp,
                                             int64_t, float* y, int64_t ldy, int64_t M,
                                             int64_t N, int64_t K) {
  capmoe_packed<float, 1>(pk_f32_table, x, ldx, wp, y, ldy, M, N, K);
}

extern "C" T_BF16 void capmoe_gemm_packed_bf16(const uint16_t* x, int64_t ldx,
                                               const uint16_t* wp, int64_t, uint16_t* y,
                                               int64_t ldy, int64_t M, int64_t N, int64_t K) {
  capmoe_packed<uint16_t, 2>(pk_bf16_table, x, ldx, wp, y, ldy, M, N, K);
}
"""

# Reentrant: a weight's weakref callback (_drop) takes it, and the garbage collector may run
# that callback while this thread holds it (packing allocates).
_lock = threading.RLock()
_fns: dict[torch.dtype, object] = {}


def _available(dtype: torch.dtype) -> bool:
    if os.environ.get("CAPMOE_CPU_PACKED", "1") == "0":
        return False
    if os.environ.get("CAPMOE_CPU_GEMM", "1") == "0":
        return False
    if dtype == torch.float32:
        return cpu_gemm._supported_cpu() and torch.backends.cpu.get_cpu_capability() == "AVX512"
    return dtype == torch.bfloat16 and cpu_gemm._bf16_cpu()


def kernel(dtype: torch.dtype):
    """The compiled packed kernel for ``dtype`` (ctypes, ``cpu_gemm.kernel``'s arguments, the
    weight's row stride unused), or ``None``: not fp32/bf16, the CPU lacks the ISA, turned off
    (``CAPMOE_CPU_PACKED=0``), or the compile failed (warned once)."""
    if dtype in _fns:
        return _fns[dtype]
    with _lock:
        if dtype in _fns:
            return _fns[dtype]
        fn = None
        if _available(dtype):
            name = "capmoe_gemm_packed_f32" if dtype == torch.float32 else "capmoe_gemm_packed_bf16"
            try:
                from torch._inductor.codecache import CppCodeCache

                fn = getattr(CppCodeCache.load(_SRC), name)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64] * 3
                fn.restype = None
            except Exception as e:
                warnings.warn(f"capmoe: packed CPU kernel unavailable ({e!r})", stacklevel=2)
                fn = None
        _fns[dtype] = fn
        return fn


def packable(w: torch.Tensor) -> bool:
    """Whether :func:`pack` takes ``w``: ``[E, out, in]`` fp32 or bf16 on CPU, ``out`` a
    multiple of 16, ``in`` even in bf16."""
    return (
        w.dim() == 3
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and w.shape[1] % 16 == 0
        and w.shape[1] > 0
        and w.shape[2] > 0
        and (w.dtype == torch.float32 or w.shape[2] % 2 == 0)
    )


def pack(w: torch.Tensor) -> torch.Tensor:
    """``w`` [E, out, in] in the packed layout (module docstring): a contiguous [E, out * in]."""
    E, N, K = w.shape
    full, tail = N - N % BLOCK, N % BLOCK
    parts = []
    for n0, width in ((0, full), (full, tail)):
        if width == 0:
            continue
        b = w[:, n0 : n0 + width].reshape(E, -1, min(width, BLOCK), K)  # [E, blocks, width, K]
        if w.dtype == torch.float32:
            b = b.permute(0, 1, 3, 2)  # [E, blocks, K, width]
        else:  # [E, blocks, K / 2, width, 2]
            b = b.reshape(*b.shape[:3], K // 2, 2).permute(0, 1, 3, 2, 4)
        parts.append(b.reshape(E, -1))
    return torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else parts[0].contiguous()


class _Entry:
    """A frozen weight: a weak reference to it, what it was packed from, and the copy."""

    __slots__ = ("ref", "stamp", "packed")

    def __init__(self, ref):
        self.ref, self.stamp, self.packed = ref, None, None


_frozen: dict[int, _Entry] = {}


def _stamp(w: torch.Tensor) -> tuple:
    return (w._version, w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)


def freeze(w: torch.Tensor) -> bool:
    """Declare ``w`` frozen (module docstring): ``True`` when it can be packed, ``False`` when
    :func:`pack` does not take it. ``ValueError`` for an inference tensor (no version counter:
    an update could not be seen)."""
    if not packable(w):
        return False
    if w.is_inference():
        raise ValueError(
            "capmoe.freeze_experts: this weight was created under torch.inference_mode, so an "
            "in-place update of it could not be seen (no version counter); create the model "
            "outside inference_mode (torch.no_grad is fine)"
        )
    key = id(w)
    with _lock:
        entry = _frozen.get(key)
        if entry is None or entry.ref() is not w:
            _frozen[key] = _Entry(weakref.ref(w, lambda _, k=key: _drop(k)))
    return True


def _drop(key: int) -> None:
    with _lock:
        entry = _frozen.get(key)
        if entry is not None and entry.ref() is None:
            del _frozen[key]


def thaw(w: torch.Tensor) -> bool:
    """Forget ``w``'s packed copy and its frozen status; whether it was frozen."""
    with _lock:
        entry = _frozen.get(id(w))
        if entry is None or entry.ref() is not w:
            return False
        del _frozen[id(w)]
        return True


def packed(w: torch.Tensor) -> torch.Tensor | None:
    """``w``'s packed copy if ``w`` is frozen (made now if it has none, or if ``w`` changed
    since: version counter, address, shape and strides compared), else ``None``."""
    entry = _frozen.get(id(w))
    if entry is None or entry.ref() is not w:
        return None
    stamp = _stamp(w)
    if entry.packed is None or entry.stamp != stamp:
        with _lock:
            if entry.packed is None or entry.stamp != stamp:
                entry.packed = None  # the old copy is freed before the new one is made
                entry.packed = pack(w.detach())
                entry.stamp = stamp
    return entry.packed


def frozen_count() -> int:
    """How many live weights are frozen (for tests and ``thaw``)."""
    return sum(1 for e in list(_frozen.values()) if e.ref() is not None)
