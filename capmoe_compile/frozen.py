"""``freeze_experts(model)``: declare a model's expert weights frozen for inference on CPU.

The CPU experts op (``capmoe::experts_cpu``) then multiplies each frozen expert weight through
a packed copy (``lowering/cpu_packed.py``: 16 outputs of one input element per vector, so no
per-output reduction). Measured on Zen 4 (AVX-512 + AVX-512 bf16, no AMX), one thread,
``python -m benchmarks.packed_ab``: MKL / packed 1.1-3.5x in fp32 at 1-512 rows, oneDNN /
packed 1.05-3.5x in bf16 at 1-128 rows (per row count in docs/performance.md).

The contract:

- **Inference.** The packed copy is made on the weight's first use by the op and kept while
  the weight lives: one more copy of the experts' weights in memory. ``thaw_experts(model)``
  frees the copies and goes back to the weights as stored.
- **Updates are seen, never missed.** Before every use, the weight's version counter (bumped
  by any in-place write: ``copy_``, ``load_state_dict``, an optimizer step), its address
  (``param.data = ...``) and its shape are compared with those it was packed from; a changed
  weight is repacked on that call. No stale copy is ever multiplied.
- **Refused loudly where an update could not be seen**: a weight created under
  ``torch.inference_mode`` has no version counter, and ``freeze_experts`` raises
  ``ValueError`` for it.

What counts as an expert weight: every 3-D parameter (the stacked ``[E, out, in]`` weights
MoE implementations keep, such as transformers' ``gate_up_proj``/``down_proj``) that the packed
kernels take (fp32 or bf16, ``out`` a multiple of 16; ``in`` even in bf16). Layers that keep one
``nn.Linear`` per expert are stacked anew on every call and are not packed. The packed kernels
run only where the op runs its few-row kernels (one intra-op thread) and on CPUs with AVX-512
(fp32) or AVX-512 bf16 (bf16); elsewhere freezing changes nothing. Results differ from the
unfrozen path by fp32 reassociation only (the same products, summed in another order).
"""

from __future__ import annotations

import warnings

import torch

from .lowering import cpu_packed


def freeze_experts(model: torch.nn.Module) -> int:
    """Declare ``model``'s expert weights frozen (module docstring); returns how many weights
    the packed kernels will take. ``ValueError`` for a weight created under
    ``torch.inference_mode`` (nothing is frozen then). Where this CPU has no packed kernel
    for the weights' dtype, a warning says so and they are left as they are (returns 0)."""
    weights = [p for p in model.parameters() if p.dim() == 3 and cpu_packed.packable(p)]
    for p in weights:
        if p.is_inference():
            cpu_packed.freeze(p)  # raises, naming the reason, before anything is frozen
    taken = [p for p in weights if cpu_packed.kernel(p.dtype) is not None]
    missing = sorted({str(p.dtype)[6:] for p in weights if cpu_packed.kernel(p.dtype) is None})
    if missing:
        warnings.warn(
            f"capmoe.freeze_experts: no packed kernel for {', '.join(missing)} on this CPU "
            "(fp32 needs ATen's AVX-512 dispatch, bf16 AVX-512 bf16; CAPMOE_CPU_PACKED=0 turns "
            "them off): those expert weights run as before",
            stacklevel=2,
        )
    return sum(cpu_packed.freeze(p) for p in taken)


def thaw_experts(model: torch.nn.Module) -> int:
    """Forget the packed copies of ``model``'s weights; returns how many were frozen."""
    return sum(cpu_packed.thaw(p) for p in model.parameters() if p.dim() == 3)
