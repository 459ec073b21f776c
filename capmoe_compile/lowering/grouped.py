"""The expert half of a rewritten MoE layer: dispatch, expert GEMMs, activation, combine.

:func:`moe_experts_grouped` is what the backend inserts into the graph. It picks, at trace
time, from static properties (device, dtype, weight size):

- CPU layers with large expert weights: ``capmoe::experts_cpu`` (``lowering/cpu_experts.py``),
  an opaque op that loops ``torch.mm`` over the kept rows of each expert;
- CUDA: ``capmoe::triton_moe_experts`` (``lowering/triton_moe.py``), hand-written Triton
  kernels with the activation and the routing-weight multiply fused into the GEMM epilogues;
- everything else: :func:`moe_experts_traced`, plain torch code that AOTAutograd traces into
  aten ops for Inductor: the sort into expert order, the gather of token rows,
  ``torch._grouped_mm`` per projection (group offsets stay on the device), the activation,
  the routing-weight multiply and the combine (a gather back into token order).

Dropped pairs (sentinel id ``E``) sort after every real pair and fall outside the last group
offset, so they cost no GEMM time. ``_grouped_mm`` leaves those rows unwritten: they are
selected away with ``where`` (never multiplied: 0 * garbage can be NaN).
"""

from __future__ import annotations

import torch

from ..experts import ExpertForm, ascending_experts, combine_rows
from ..library import custom_op
from . import kernels
from .cpu_experts import experts_cpu
from .invariant import tiled_grouped_mm

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
#: Expert weight elements (all experts, all projections) from which CPU layers use
#: ``capmoe::experts_cpu`` (see :func:`moe_experts_grouped`): 4 Mi, e.g. E=8, H=512, F=512.
CPU_OP_MIN_WEIGHTS = 1 << 22


def supports(form: ExpertForm, dtype: torch.dtype) -> bool:
    """Whether :func:`moe_experts_grouped` handles this expert form and dtype (one of the
    kernels below does: :func:`_traced_supports`'s conditions)."""
    return _traced_supports_form(form, dtype)[0]


def _traced_supports_form(form: ExpertForm, dtype: torch.dtype) -> tuple[bool, str]:
    if not form.stacked:
        return False, "experts are separate modules, not stacked [E, ...] weights"
    if not form.projections_only:
        return False, f"the {form.family} form computes more than its projections"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"{str(dtype).removeprefix('torch.')} (fp32 and bf16 only)"
    return True, ""


@custom_op("capmoe::grouped_mm")
def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, tile: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch._grouped_mm`` behind an op of our own: in torch 2.13 its meta kernel refuses
    fp32 although the CPU kernel runs it, so Inductor calls it as an extern kernel.

    ``tile`` (a 0-d int tensor from ``capmoe::route_layer``), when positive, asks for
    batch-invariant arithmetic: fixed-size row tiles (``lowering/invariant.py``).

    ``torch._grouped_mm`` wants every non-unit stride to be a multiple of 16 bytes; layers whose
    in or out size is not (e.g. bf16 with H = 12) are zero-padded to it (a copy of the weights
    per call: only such odd, small layers pay it)."""
    if tile is not None and int(tile) > 0:
        return tiled_grouped_mm(a, b, offs, int(tile))
    n = 16 // a.element_size()
    K, N = a.shape[-1], b.shape[-1]
    if K % n == 0 and N % n == 0:
        return torch._grouped_mm(a, b, offs=offs)
    pk, pn = -K % n, -N % n
    a = torch.nn.functional.pad(a, (0, pk))
    b = torch.nn.functional.pad(b, (0, pn, 0, pk))
    return torch._grouped_mm(a, b, offs=offs)[:, :N].contiguous()


@grouped_mm.register_fake
def _grouped_mm_fake(a, b, offs, tile=None):
    return a.new_empty(a.shape[0], b.shape[-1])


def _gemm(h: torch.Tensor, w: torch.Tensor, transposed: bool, offs: torch.Tensor, tile):
    # grouped_mm wants [E, in, out]; nn.Linear-style storage is [E, out, in].
    return grouped_mm(h, w if transposed else w.transpose(-2, -1), offs, tile)


@torch.compiler.assume_constant_result
def _form_str(form: ExpertForm) -> str:
    # a frozen dataclass: Dynamo takes the string as a constant instead of tracing json.dumps
    return form.to_str()


def moe_experts_grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: ExpertForm | str,
    tile: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``; sentinel ids skipped.

    ``form`` may be given as its string (how the backend passes it through an FX graph).
    ``tile``: see :func:`grouped_mm` (``None``: the fastest GEMM).

    On CPU, layers with at least ``CPU_OP_MIN_WEIGHTS`` expert weight elements (a static
    property of the parameters, decided at trace time) run ``capmoe::experts_cpu``
    (``lowering/cpu_experts.py``): 1.1-1.4x faster than the traced path at the benchmark's
    shapes. Smaller layers, and other devices, run :func:`moe_experts_traced`: there the op's
    fixed cost per call and per expert (host loop, ~0.3-0.5 ms) outweighs the GEMMs (measured:
    H=256, F=512, E=8, T=256: 3.1 ms traced vs 3.6 ms op; ``benchmarks.ci``'s timing block).
    """
    f = ExpertForm.from_str(form) if isinstance(form, str) else form
    kernel, _ = kernels.choose(kernels.KernelQuery.of(x, params, f))
    return kernel.run(x, ids, weights, params, form if isinstance(form, str) else f, tile)


def describe(x: torch.Tensor, params: list[torch.Tensor], form: ExpertForm) -> str:
    """Which kernel runs these (example) tensors, and why not the ones before it: decided at
    trace time from static properties (device, dtype, form, weight size); for ``explain``."""
    return kernels.describe_choice(kernels.KernelQuery.of(x, params, form))


def moe_experts_traced(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    form: ExpertForm | str,
    tile: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`moe_experts_grouped` as traced torch code: the sort, the gather into expert order,
    ``capmoe::grouped_mm`` per projection, the activation and the gather combine, which
    AOTAutograd traces into aten ops for Inductor to fuse (module docstring)."""
    f = ExpertForm.from_str(form) if isinstance(form, str) else form
    p = dict(zip(f.roles, params, strict=True))
    E = f.num_experts(params)
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    eid = flat[order]
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    counts = counts.scatter_add_(0, flat.clamp(0, E), torch.ones_like(flat, dtype=torch.int32))
    offs = counts[:E].cumsum(0, dtype=torch.int32)
    xs = x[order // k]
    eb = eid.clamp_max(E - 1)

    def proj(role: str, h: torch.Tensor) -> torch.Tensor:
        y = _gemm(h, p[role], role in f.transposed, offs, tile)
        b = p.get("b_" + role)
        return y if b is None else y + b[eb]

    y = f.mlp(xs, proj)
    if not f.projections_only:  # a row-wise step after (lowering/epilogue.py's kernel)
        shared = f.shared_roles
        y = f.after(y, {r: p[r] if r in shared else p[r][eb] for r in f.vector_roles})
    # Combine as a gather: each token reads its k rows back from expert order, weighted and
    # masked in token order, one reduction over k that Inductor fuses (an index_add_ would be
    # per-element atomics, and weighting in expert order a second [T*k, H] buffer).
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * k, device=x.device))
    rows = y[pos].view(T, k, -1)
    if f.combine == "dtype":  # each token's pairs in ascending expert id (ExpertForm.combine)
        o = ascending_experts(ids)
        rows = rows.gather(1, o[:, :, None].expand_as(rows))
        weights, ids = weights.gather(1, o), ids.gather(1, o)
    keep = (ids < E)[:, :, None]
    return combine_rows(rows, weights, keep, f, x.dtype)


# --- the experts kernels (lowering/kernels.py), highest priority first --------------------------


def _cpu_op_supports(q: kernels.KernelQuery) -> tuple[bool, str]:
    if q.device.type != "cpu":
        return False, "not on CPU"
    ok, why = _traced_supports_form(q.form, q.dtype)
    if not ok or not q.same_dtype:
        return False, why or "expert weights in another dtype than the tokens"
    if q.weight_elements < CPU_OP_MIN_WEIGHTS:
        n = q.weight_elements
        size = f"{n / 2**20:.2g} Mi elements" if q.explain else "fewer elements"
        return False, (
            f"expert weights {size} < {CPU_OP_MIN_WEIGHTS >> 20} Mi "
            "(the op's fixed cost per call outweighs the GEMMs)"
        )
    return True, ""


def _cpu_op_run(x, ids, weights, params, form, tile):
    f_str = form if isinstance(form, str) else _form_str(form)
    return experts_cpu(x, ids, weights, params, f_str, tile)


def _triton_supports(q: kernels.KernelQuery) -> tuple[bool, str]:
    if q.device.type != "cuda":
        return False, "not on CUDA"
    from . import triton_moe  # imports triton: only where it can run

    if not q.same_dtype:
        return False, "expert weights in another dtype than the tokens"
    if not triton_moe.supports(q.form, q.dtype, q.device):
        return False, "form or dtype the fused kernels do not cover"
    return True, ""


def _triton_run(x, ids, weights, params, form, tile):
    from . import triton_moe

    # The hand-written fused kernels (lowering/triton_moe.py). Never timed on a GPU here
    # (none was lent), and ``tile`` is not read: no batch invariance on CUDA yet.
    f = ExpertForm.from_str(form) if isinstance(form, str) else form
    return triton_moe.moe_experts_triton(x, ids, weights, params, f)


def _traced_supports(q: kernels.KernelQuery) -> tuple[bool, str]:
    ok, why = _traced_supports_form(q.form, q.dtype)
    if ok and not q.same_dtype:
        return False, "expert weights in another dtype than the tokens"
    return ok, why


def _reference_run(x, ids, weights, params, form, tile):
    from ..experts import moe_experts_op

    f_str = form if isinstance(form, str) else form.to_str()
    return moe_experts_op(x, ids, weights, params, f_str, tile)


CPU_OP, TRITON_OP, TRACED = "capmoe::experts_cpu", "capmoe::triton_moe_experts", "traced grouped_mm"
REFERENCE = "reference"
kernels.register_kernel(kernels.Kernel(CPU_OP, 30, _cpu_op_supports, _cpu_op_run))
kernels.register_kernel(kernels.Kernel(TRITON_OP, 20, _triton_supports, _triton_run))
kernels.register_kernel(kernels.Kernel(TRACED, 10, _traced_supports, moe_experts_traced))
kernels.register_kernel(
    kernels.Kernel(REFERENCE, 0, lambda q: (True, ""), _reference_run, opaque=True)
)
