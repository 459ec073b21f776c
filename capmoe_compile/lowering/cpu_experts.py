"""The experts of an MoE layer on CPU: one opaque op, a loop of per-expert GEMMs on the host.

``capmoe::experts_cpu(x, ids, weights, params, form, tile)`` computes SPEC.md's
``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` (sentinel id ``E`` and any id
``>= E`` skipped) exactly as ``experts.moe_experts_reference`` structures it: experts in
order ``0..E-1``, each one's rows gathered, run through the expert, weighted in fp32 and added
into an fp32 ``[T, H]`` output (or, for ``ExpertForm.combine == "dtype"``, rounded to the
layer's dtype and added in it, in ascending expert id, as the layer's own loop does). In bf16
every GEMM is ATen's bf16 GEMM (fp32 accumulation, rounded once per product), the activation
runs in bf16 as the reference's does, and the combine accumulates in fp32 unless the form says
"dtype". What makes it the fast CPU path (measured in
``benchmarks/moe_layer.py``; the numbers are in the commit messages):

- Only kept rows are touched: ``sum(counts[:E])`` rows are gathered, multiplied, activated and
  combined; dropped pairs (and ``expanded_drop``'s ``T*E``-wide id matrix) cost one sort and a
  count, nothing per hidden element.
- Intermediates stay small: an expert's rows go through in chunks whose widest intermediate
  (``[rows, 2F]``) is at most ``CHUNK_BYTES`` (30 MiB). glibc serves allocations above its mmap threshold
  (at most 32 MiB) with fresh ``mmap``s that page-fault on every call: the traced grouped path's
  ``[T*k, 2F]`` fp32 buffer is 64 MiB at the prefill shape and cost ~20% of the gate/up GEMM.
- The activation is fused in place: ``act_(gate) *= up`` on the gate/up GEMM's output, and the
  down GEMM reads that strided view directly (no ``[rows, F]`` copy).
- One ``torch.mm`` per expert and projection on a contiguous slab of rows (the large-``M``
  kernels, ~95% of the measured peak at ``M >= 1024``); ``torch._grouped_mm``'s CPU kernel is
  the same loop of mm (measured equal), so nothing is lost by looping here.
- Few ops per expert: consecutive experts form segments (at most ``CHUNK_BYTES`` of gathered
  rows); each segment's rows are gathered once, every expert of it writes its output straight
  into one ``[rows, H]`` slab, and the slab is weighted and combined (``index_add_``) once.
  Per expert that leaves the two GEMMs and the in-place activation: with E = 64..256 small
  experts, or at decode, the per-op cost of a host loop is what decides the time.
- Few rows, one intra-op thread, fp32: groups of at most ``cpu_gemm.max_rows`` rows (16 to
  96 by the weight's shape) go through ``cpu_gemm``'s kernel, which reads the weight as
  stored (``[out, in]``) instead of having MKL pack it on every call, with the routing
  weights folded into the down projection's input (no down bias): decode op (T=16, H=1024,
  F=2048, E=8) 41.9 -> 19.4 ms, thread time, interleaved (``lowering/cpu_gemm.py`` has the
  per-product figures). In bf16, on CPUs with AVX-512 bf16 (no AMX needed), groups of at
  most ``cpu_gemm.MAX_ROWS_BF16`` (8) rows go through its bf16 kernel (``vdpbf16ps``, fp32
  sums, one rounding to bf16 per output, as ATen's bf16 GEMM): 1.2-7x faster than oneDNN's
  per call at 1-4 rows (Zen 4, one thread; no weights folded: that would round the folded
  product to bf16). Layers it does not take (``[in, out]`` storage, H < ``cpu_gemm.MIN_IN``,
  more threads, bf16 without AVX-512 bf16) keep the rules below.
- Small groups are computed transposed, ``W^T @ rows^T`` (:func:`_transposed_rows`): MKL's
  fp32 GEMM with few rows against a large transposed weight packs the weight on every call.
  With one intra-op thread that pays for 2..6-row groups (1.3-1.5x per expert); with two or
  more, as measured when the rule was introduced, for 7..256-row groups of layers with
  ``H * F >= 2 Mi`` (12 rows of a 4096 x 1024 weight: 1.0 ms as ``rows @ W^T``, 0.66 ms as
  ``W @ rows^T``).

The counts are read on the host (``.tolist()``): a synchronisation that is free on CPU and, inside
an opaque custom op, invisible to the compiled graph (static shapes, no graph break). Inductor
calls the op as an extern kernel; the router, the capacity selection and everything around the
layer stay in Inductor's generated code.

While ``torch.profiler`` records, the op's time is split into ``capmoe::dispatch``,
``capmoe::experts`` and ``capmoe::combine`` ranges (:func:`_phase`; nothing is opened
otherwise).

``tile > 0`` (batch-invariant arithmetic, ``lowering/invariant.py``): every expert's rows go
through the whole expert in zero-filled tiles of exactly ``tile`` rows, as
``experts.moe_experts_reference(..., tile)`` does, so a row's result does not depend on how
many rows share its expert.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from ..experts import ExpertForm
from ..forms import apply_inplace
from ..library import custom_op
from . import cpu_gemm, cpu_packed

#: Upper bound on one chunk's widest intermediate ([rows, 2F] of the gate/up GEMM). Well under
#: glibc's largest dynamic mmap threshold (32 MiB), so the buffers come from the heap.
CHUNK_BYTES = 30 << 20
#: Fewest rows per chunk (the GEMM's efficiency falls off below a few hundred rows).
MIN_CHUNK_ROWS = 256


#: Scratch buffers larger than this are allocated per call instead of kept (see _scratch).
SCRATCH_MAX_BYTES = 256 << 20

_tls = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape`` view of this thread's persistent buffer for ``slot``.

    Scratch (gathered rows, GEMM outputs) is reused from call to call instead of being
    allocated each time: glibc hands out every allocation above its mmap threshold as fresh
    pages that fault on first touch, and at the prefill shape that cost ~13% of the layer
    (measured: 189 ms vs 164 ms with the threshold raised). Every element of a slot is
    written before it is read within one chunk; under ``torch.use_deterministic_algorithms``
    with ``fill_uninitialized_memory`` (the tests' NaN poison), slots are NaN-filled on every
    fetch, exactly as ``torch.empty`` would be. Kept per thread (no sharing between
    concurrent calls), grown on demand, at most ``SCRATCH_MAX_BYTES`` per slot;
    :func:`clear_scratch` frees them."""
    numel = math.prod(shape)
    if numel * dtype.itemsize > SCRATCH_MAX_BYTES:
        buf = torch.empty(shape, dtype=dtype)
    else:
        bufs = _tls.__dict__.setdefault("bufs", {})
        flat = bufs.get((slot, dtype))
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=dtype)
            bufs[(slot, dtype)] = flat
        buf = flat[:numel].view(shape)
    if _tls.poison and dtype.is_floating_point:
        buf.fill_(float("nan"))
    return buf


def _phase(name: str):
    """A ``capmoe::<name>`` range for torch.profiler while it records (the in-situ breakdown of
    ``benchmarks/moe_layer.py``: dispatch, experts, combine); nothing otherwise (a
    ``record_function`` costs ~9 us even with no profiler running, the check ~0.1 us)."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(f"capmoe::{name}")
    return contextlib.nullcontext()


def clear_scratch() -> None:
    """Free this thread's scratch buffers."""
    _tls.__dict__.pop("bufs", None)


def _w(p: dict[str, torch.Tensor], f: ExpertForm, role: str, e: int, ws=None) -> torch.Tensor:
    """Expert ``e``'s weight of ``role`` as ``[in, out]`` (a view). ``ws``: the weights
    already unbound per expert (``{role: p[role].unbind(0)}``, one call per layer call)."""
    w = p[role][e] if ws is None else ws[role][e]
    return w if role in f.transposed else w.t()


_SLOT = {"gate_up": "gu", "gate": "g", "up": "u", "down": "y"}


def _lin(h: torch.Tensor, p, f: ExpertForm, role: str, e: int, ws=None, out=None, nt=None):
    """``h @ W + b``: rows ``h`` [n, in] -> [n, out], into ``out`` or scratch. ``nt`` (a
    :class:`_FewRows`): few enough rows (``cpu_gemm.max_rows``) of a role it lists go
    through the few-row kernel; otherwise ``torch.mm``."""
    spec = None if nt is None else nt.roles.get(role)
    if spec is not None and h.shape[0] <= spec[6] and h.stride(1) == 1:
        fn, base, step, ldw, n_out, n_in = spec[:6]
        if out is None:
            out = _scratch(_SLOT[role], (h.shape[0], n_out), h.dtype)
        ptr = base + e * step
        fn(h.data_ptr(), h.stride(0), ptr, ldw, out.data_ptr(), out.stride(0), len(h), n_out, n_in)
        y = out
    else:
        w = _w(p, f, role, e, ws)
        if out is None:
            out = _scratch(_SLOT[role], (h.shape[0], w.shape[1]), h.dtype)
        y = torch.mm(h, w, out=out)
    b = p.get("b_" + role)
    return y if b is None else y.add_(b[e])


def _lin_t(h_t: torch.Tensor, p, f: ExpertForm, role: str, e: int, ws=None) -> torch.Tensor:
    """The same product transposed, ``W^T @ h^T + b``: ``h_t`` [in, n] -> [out, n]."""
    w_t = _w(p, f, role, e, ws).t()
    y = torch.mm(w_t, h_t, out=_scratch(_SLOT[role], (w_t.shape[0], h_t.shape[1]), h_t.dtype))
    b = p.get("b_" + role)
    return y if b is None else y.add_(b[e][:, None])


def _expert(h: torch.Tensor, p, f: ExpertForm, e: int, ws=None, out=None, nt=None, wts=None):
    """Expert ``e`` on rows ``h`` [n, H] -> [n, H] in ``h``'s dtype (the math of
    ``ExpertForm.apply``, with the activation and the gating product in place); the result
    goes into ``out`` (a contiguous [n, H]) when given. ``nt``: see :func:`_lin`. ``wts``
    ([n, 1] fp32, only for forms without a down bias): the rows' routing weights, applied to
    the down projection's input instead of its output (``(w * h) @ W_down``: the same
    product up to fp32 reassociation, on [n, F] instead of [n, H] elements)."""

    def project(role: str, v: torch.Tensor) -> torch.Tensor:
        if role == "down" and wts is not None:
            v = v.mul_(wts)  # v is this expert's own intermediate (scratch or a fresh tensor)
        return _lin(v, p, f, role, e, ws, out if role == "down" else None, nt)

    return f.mlp(h, project, act=functools.partial(apply_inplace, f.act), inplace=True)


def _expert_t(h: torch.Tensor, p, f: ExpertForm, e: int, ws=None) -> torch.Tensor:
    """:func:`_expert` computed transposed (``W^T @ h^T``, the weight as the GEMM's left
    operand): MKL's fp32 GEMM with a few rows and a large transposed right operand packs the
    weight on every call (12 rows of a 4096 x 1024 weight, two threads: 1.0 ms as
    ``rows @ W^T``, 0.66 ms as ``W @ rows^T``). Both GEMMs get their row operand as the
    transpose of a row-major ``[n, in]`` block: given a contiguous ``[in, n]`` instead, MKL
    was 1.3-3x slower for 2..8 rows (one thread; ``benchmarks/moe_layer.py`` notes), so the
    activation's ``[F, n]`` result is copied to ``[n, F]`` (a few KiB) before the down GEMM.
    The same arithmetic per element; returns a [n, H] view."""

    def project(role: str, v_t: torch.Tensor) -> torch.Tensor:
        if role != "down":
            return _lin_t(v_t, p, f, role, e, ws)
        rows = _scratch("it", (v_t.shape[1], v_t.shape[0]), v_t.dtype).copy_(v_t.t())
        return _lin_t(rows.t(), p, f, "down", e, ws)

    return f.mlp(
        h.t(), project, act=functools.partial(apply_inplace, f.act), inplace=True, split_dim=0
    ).t()


#: Group sizes computed by :func:`_expert_t` with two or more intra-op threads (measured
#: then: faster from 7 rows, equal from ~512), in layers with H * F >= TRANSPOSED_MIN_HF: with
#: smaller weights MKL's packing is cheap and the transposed form is slower (H=512, F=1024,
#: 64-row groups: 14.2 ms vs 10.8 ms a call).
TRANSPOSED_ROWS = range(7, 257)
TRANSPOSED_MIN_HF = 1 << 21
#: Fewer intra-op threads than this: only groups of ``ONE_THREAD_ROWS`` rows (any layer size)
#: are computed transposed (:func:`_transposed_rows`).
TRANSPOSED_MIN_THREADS = 2
ONE_THREAD_ROWS = range(2, 7)


def _transposed_rows(big: bool) -> range:
    """The group sizes :func:`_expert_t` computes in this call.

    With one intra-op thread (what a loaded, shared CPU should run: with two, OpenMP's
    barriers made every GEMM path 5-10x slower under a load average of 6 on 2 cores), the
    7..256-row rule was slower at the decode shape (T=16, H=1024, F=2048, E=8: op 48.8 vs 38.1,
    57.9 vs 45.3, 65.2 vs 50.0 ms, medians of three interleaved runs); per expert, 2..6 rows
    ran 1.3-1.5x faster transposed at F=768 and F=2048, 1 and >= 8 rows the same or slower
    (``benchmarks/moe_layer.py``'s notes). With two or more threads: the rule measured when
    it was introduced."""
    if torch.get_num_threads() < TRANSPOSED_MIN_THREADS:
        return ONE_THREAD_ROWS
    return TRANSPOSED_ROWS if big else range(0)


def _above(rows: range, n: int) -> range:
    """The sizes of ``rows`` above ``n``."""
    return range(max(rows.start, n + 1), rows.stop) if len(rows) else rows


class _FewRows:
    """For each weight role computed by a few-row kernel: ``(kernel, address of expert 0's
    weight, bytes from one expert to the next, row stride, out, in, most rows[, the packed
    copy])``, read once per call (no per-expert views). The kernel is ``cpu_packed``'s with the weight's packed copy
    (a frozen weight), else ``cpu_gemm``'s with the weight as stored (``[out, in]``)."""

    __slots__ = ("roles", "chunk")

    def __init__(self, roles: dict[str, tuple], chunk: int | None = None):
        # chunk: most rows per chunk when every projection is packed (the packed kernel beats
        # torch.mm up to its row limit: chunks are cut there instead of going to torch.mm)
        self.roles, self.chunk = roles, chunk


def _few_row_kernel(f: ExpertForm, p: dict[str, torch.Tensor], x: torch.Tensor):
    """A :class:`_FewRows` for this call, or ``None``: fp32 (``cpu_gemm.kernel``) or bf16 on a
    CPU with AVX-512 bf16 (``cpu_gemm.kernel_bf16``), one intra-op thread (the kernel runs
    on the calling thread alone; with more, ``torch.mm`` spreads one product over them), no
    weight stored ``[in, out]``, hidden size at least ``cpu_gemm.MIN_IN``. Roles whose ``in``
    is below ``cpu_gemm.MIN_IN`` (a small F's down projection) keep ``torch.mm``. Where the
    fp32 kernel is used, no group is computed transposed: the kernel reads the weight as
    stored, which is what the transposed form was for; the bf16 kernel takes at most
    ``cpu_gemm.MAX_ROWS_BF16`` rows (:func:`_transposed_rows` keeps the rest)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or f.transposed:
        return None
    if torch.get_num_threads() != 1 or x.shape[-1] < cpu_gemm.MIN_IN:
        return None
    fn = cpu_gemm.kernel() if x.dtype == torch.float32 else cpu_gemm.kernel_bf16()
    fn_packed = cpu_packed.kernel(x.dtype)
    if fn is None and fn_packed is None:
        return None
    roles = {}
    for r in f.roles:
        w = p[r]
        if r.startswith("b_") or w.dtype != x.dtype or w.dim() != 3 or w.device.type != "cpu":
            continue
        if w.stride(2) != 1 or w.shape[2] < cpu_gemm.MIN_IN:
            continue
        n_out, n_in = w.shape[1], w.shape[2]
        packed = None if fn_packed is None else cpu_packed.packed(w)
        if packed is not None:
            step = packed.stride(0) * packed.element_size()
            rows = cpu_packed.MAX_ROWS[x.dtype]
            # the packed tensor rides along: alive for this call even if a concurrent update
            # replaces the weight's copy meanwhile
            roles[r] = (fn_packed, packed.data_ptr(), step, 0, n_out, n_in, rows, packed)
        elif fn is not None:
            rows = (
                cpu_gemm.max_rows(n_out, n_in)
                if x.dtype == torch.float32
                else cpu_gemm.MAX_ROWS_BF16
            )
            step = w.stride(0) * w.element_size()
            roles[r] = (fn, w.data_ptr(), step, w.stride(1), n_out, n_in, rows)
    projections = [r for r in f.roles if not r.startswith("b_")]
    packed_all = all(r in roles and roles[r][0] is fn_packed for r in projections)
    chunk = cpu_packed.MAX_ROWS[x.dtype] if packed_all else None
    return _FewRows(roles, chunk) if roles else None


def _chunk_rows(f: ExpertForm, params: dict[str, torch.Tensor], elem: int) -> int:
    role = "gate_up" if "gate_up" in f.roles else ("gate" if "gate" in f.roles else "up")
    w = params[role]
    width = w.shape[-1] if role in f.transposed else w.shape[-2]
    if "gate" in f.roles:
        width *= 2  # gate and up results live together
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, width * elem))


#: Most gathered rows one segment of consecutive experts holds (see :func:`_segments`): the
#: ``[rows, H]`` input and output slabs stay under ``CHUNK_BYTES`` each.
def _segment_rows(H: int, elem: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, H * max(elem, 4)))


def _segments(counts: list[int], cap: int):
    """Runs of consecutive experts ``(first, last + 1, rows)`` of at most ``cap`` rows (an
    expert with more rows than ``cap`` is a run of its own and is chunked inside it)."""
    out, first, rows = [], 0, 0
    for e, c in enumerate(counts):
        if rows and rows + c > cap:
            out.append((first, e, rows))
            first, rows = e, 0
        rows += c
    if rows:
        out.append((first, len(counts), rows))
    return out


@functools.lru_cache(maxsize=64)
def _form(form: str) -> ExpertForm:
    return ExpertForm.from_str(form)


@custom_op("capmoe::experts_cpu")
def experts_cpu(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: str,
    tile: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` on CPU (module docstring)."""
    f = _form(form)
    p = dict(zip(f.roles, params, strict=True))
    E = params[0].shape[0]
    T, k = ids.shape
    H = x.shape[-1]
    t = 0 if tile is None else int(tile)
    # the tests' poison mode (torch.empty fills with NaN): scratch is NaN-filled the same way
    _tls.poison = (
        torch.are_deterministic_algorithms_enabled()
        and torch.utils.deterministic.fill_uninitialized_memory
    )
    # ExpertForm.combine "dtype" (bf16/fp16 layers whose own loop sums in their dtype): each
    # weighted product rounded to x's dtype and added in it, experts in ascending id order (the
    # order the sorted rows come in); otherwise summed in fp32 and rounded once.
    acc = x.dtype if f.combine == "dtype" else torch.float32
    with _phase("dispatch"):  # counts, sort, routing weights in expert order, zeroed output
        out = torch.zeros(T, H, dtype=acc, device=x.device)
        if T == 0 or k == 0:
            return out.to(x.dtype)
        flat = ids.reshape(-1)
        # ids >= E (the sentinel) count in the last bin and sort after every kept pair.
        counts = torch.bincount(flat.clamp(0, E), minlength=E + 1)[:E].tolist()
        kept = sum(counts)
        if kept == 0:
            return out.to(x.dtype)
        order = torch.argsort(flat, stable=True)[:kept]
        tok_all = torch.div(order, k, rounding_mode="floor")
        if t == 0:
            # Kept pairs' routing weights in expert order, fp32, gathered once.
            w_all = weights.reshape(-1).index_select(0, order).to(torch.float32)
    if t > 0:
        _tiled(x, tok_all, order, weights.reshape(-1), counts, p, f, t, out)
        return out.to(x.dtype)
    nt = _few_row_kernel(f, p, x)
    t_rows = _transposed_rows(p["down"][0].numel() >= TRANSPOSED_MIN_HF)
    if nt is not None:  # the kernel's groups are not computed transposed
        t_rows = range(0) if x.dtype == torch.float32 else _above(t_rows, cpu_gemm.MAX_ROWS_BF16)
    # with the fp32 kernel (no transposed groups): routing weights folded into the down
    # projection's input, per expert (see _expert), when there is no down bias (not in bf16:
    # the folded product would be rounded to bf16 before the down GEMM)
    fold = nt is not None and x.dtype == torch.float32 and "b_down" not in p
    w_roles = {r: p[r].unbind(0) for r in f.roles if not r.startswith("b_")}
    # Segments of consecutive experts: one gather of their rows, the experts' outputs written
    # side by side into one slab, one weighting and one combine per segment (not per expert:
    # with E = 64..256 small experts, or at decode, the per-op cost dominates).
    start = 0
    for first, last, n_seg in _segments(counts, _segment_rows(H, x.element_size())):
        tok = tok_all[start : start + n_seg]
        with _phase("dispatch"):
            xs = torch.index_select(x, 0, tok, out=_scratch("x", (n_seg, H), x.dtype))
        ys = _scratch("ys", (n_seg, H), x.dtype)
        with _phase("experts"):
            w_seg = w_all[start : start + n_seg] if fold else None
            _segment_experts(xs, ys, counts[first:last], first, p, f, w_roles, nt, w_seg, t_rows)
        with _phase("combine"):
            if fold:
                out.index_add_(0, tok, ys)
            else:
                _combine(out, tok, ys, w_all[start : start + n_seg, None], counts[first:last])
        start += n_seg
    with _phase("combine"):
        return out.to(x.dtype)


def _combine(out, tok, ys, wts, counts=()) -> None:
    """``out[tok[i]] += wts[i] * ys[i]``: the product in fp32 (``wts`` [n, 1] fp32), added into
    ``out`` in its dtype: fp32 (one rounding at the end), or the layer's own dtype for
    ``ExpertForm.combine == "dtype"``: each product rounded, then added in that dtype, one
    ``index_add_`` per expert (``counts``: the rows of each expert in ``ys``, in ascending id)
    as the reference's loop adds them: within one call ``index_add_`` may sum a token's
    repeated rows in fp32 before rounding (it does under deterministic algorithms)."""
    n, H = ys.shape
    y = ys if ys.dtype == torch.float32 else _scratch("y32", (n, H), torch.float32).copy_(ys)
    y = y.mul_(wts)
    if out.dtype == torch.float32:
        out.index_add_(0, tok, y)
        return
    y = _scratch("yc", (n, H), out.dtype).copy_(y)
    s = 0
    for c in counts or (n,):
        if c:
            out.index_add_(0, tok[s : s + c], y[s : s + c])
        s += c


def _segment_experts(xs, ys, counts, first, p, f: ExpertForm, w_roles, nt, w_seg, t_rows):
    """Experts ``first, first + 1, ...`` (``counts`` rows each) of one segment: rows ``xs``
    [n_seg, H] in expert order -> ``ys`` [n_seg, H], each expert in balanced chunks of at most
    :func:`_chunk_rows` rows. ``w_seg`` ([n_seg] fp32): the rows' routing weights when they
    are folded into the down projection (:func:`_expert`), else ``None``."""
    rows_per = _chunk_rows(f, p, xs.element_size())
    if nt is not None and nt.chunk:
        rows_per = min(rows_per, nt.chunk)
    s = 0
    for e, c in enumerate(counts, start=first):
        if c == 0:
            continue
        n_chunks = -(-c // rows_per)
        size = -(-c // n_chunks)  # balanced chunks
        for a in range(s, s + c, size):
            n = min(size, s + c - a)
            rows = xs[a : a + n]
            if n in t_rows:
                ys[a : a + n].copy_(_expert_t(rows, p, f, e, w_roles))
            else:
                wts = None if w_seg is None else w_seg[a : a + n, None]
                _expert(rows, p, f, e, w_roles, out=ys[a : a + n], nt=nt, wts=wts)
        s += c


def _tiled(x, tok_all, order, w_flat, counts, p, f: ExpertForm, t: int, out) -> None:
    """The batch-invariant path (``tile > 0``): every expert's rows in zero-filled tiles of
    exactly ``t`` rows, one expert and one tile at a time (lowering/invariant.py)."""
    H = x.shape[-1]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        for s in range(start, start + c, t):
            n = min(t, start + c - s)
            tok = tok_all[s : s + n]
            # fixed [t, H] input, zero-filled past the group's rows (lowering/invariant.py)
            rows = _scratch("x", (t, H), x.dtype).zero_()
            torch.index_select(x, 0, tok, out=rows[:n])
            y = _expert(rows, p, f, e)[:n]
            _combine(out, tok, y, w_flat[order[s : s + n]].to(torch.float32)[:, None])
        start += c


@experts_cpu.register_fake
def _experts_cpu_fake(x, ids, weights, params, form, tile=None):
    return torch.empty_like(x)
