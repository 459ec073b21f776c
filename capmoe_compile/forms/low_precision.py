"""The gated or plain MLP computed in bf16 (or fp16) inside a wider layer (torchtitan's
``GroupedExperts`` in a float32 model: ``x.bfloat16()`` and every weight ``.bfloat16()``, the
three grouped GEMMs, the activation and the product in bf16, then ``.type_as(x)``).

The form rounds where such experts round: the rows and the expert's tensors are cast to the
low dtype, the MLP runs in it (each projection's product rounded to it, the activation and the
gate product too), and the result is cast back to the layer's dtype
(:meth:`ExpertForm.apply` through :meth:`FormFamily.compute_dtype`). A float32 MLP would not
be what eager computes (the bf16 rounding is part of the layer), so none is proposed in its
place. Candidates are proposed only for a region whose code casts to a low float dtype, and
kept only if they reproduce it at float32's tolerance, like every form. The casts are a step
around the projections: only the reference kernel runs these experts."""

from __future__ import annotations

import torch

from .base import FormFamily, register_form

#: the low float dtypes, by the name a form carries (``extra``: ("compute", name))
_LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: methods that cast to one
_CAST_METHODS = {"bfloat16": "bfloat16", "half": "float16"}


def _low_dtypes(n) -> list[str]:
    found = []
    if n.op == "call_method" and n.target in _CAST_METHODS:
        found.append(_CAST_METHODS[n.target])
    if n.op in ("call_method", "call_function"):
        for a in (*n.args, *n.kwargs.values()):
            if isinstance(a, torch.dtype):
                found += [name for name, dt in _LOW.items() if dt == a]
    return found


class LowPrecisionMLP(FormFamily):
    name = "low_precision"
    order = 50
    doc = "an MLP computed in bf16/fp16 inside a wider layer"
    projections_only = False

    def constants(self, nodes):
        """The low float dtypes the region's code casts to (``.bfloat16()``, ``.half()``,
        a bf16/fp16 dtype argument), in the order first seen; none: nothing to propose."""
        out: list[str] = []
        for n in nodes:
            for name in _low_dtypes(n):
                if name not in out:
                    out.append(name)
        return out

    def propose(self, layout, dtypes):
        if layout.vector_roles:
            return
        yield from self.forms_of(layout, ((("compute", dt),) for dt in dtypes))

    def compute_dtype(self, form):
        return _LOW[form.option("compute")]

    def describe(self, form):
        return [f"computed in {form.option('compute')}"]


register_form(LowPrecisionMLP())

__all__ = ["LowPrecisionMLP"]
