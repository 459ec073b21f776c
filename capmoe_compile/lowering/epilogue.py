"""Experts whose form adds a row-wise step after the projections, traced for Inductor.

Forms such as ``expert_norm`` (an RMSNorm of each expert's output with the expert's own
scale: transformers' Ergo) are more than their projections, so the fused kernels
(``capmoe::experts_cpu``, Triton, the traced grouped GEMM) decline them. When the family's
step is row-wise (:attr:`capmoe_compile.forms.FormFamily.rowwise_after`), this kernel runs
them as the traced grouped GEMM does (``grouped.moe_experts_traced``: the sort into expert
order, ``capmoe::grouped_mm`` per projection, the activation), then the family's step on
the rows in expert order with each vector role gathered by the row's expert id, then the
gather combine: aten ops Inductor fuses, where the reference kernel is an opaque op looping
over experts in Python.
"""

from __future__ import annotations

from . import grouped, kernels

NAME = "traced grouped_mm + row-wise epilogue"


def supports(q: kernels.KernelQuery) -> tuple[bool, str]:
    f = q.form
    if f.projections_only:
        return False, "the form is its projections alone (the kernels above run those)"
    if not f.rowwise_after:
        return False, f"the {f.family} form's step after the projections is not row-wise"
    if not f.stacked:
        return False, "experts are separate modules, not stacked [E, ...] weights"
    if q.dtype not in grouped.SUPPORTED_DTYPES:
        return False, f"{str(q.dtype).removeprefix('torch.')} (fp32 and bf16 only)"
    if not q.same_dtype:
        return False, "expert weights in another dtype than the tokens"
    return True, ""


kernels.register_kernel(kernels.Kernel(NAME, 5, supports, grouped.moe_experts_traced))
