"""An MLP, then an RMSNorm of each expert's output with the expert's own learned scale
(Ergo, transformers 5.25: squared-ReLU experts, ``rms_norm(y.float()) * norm[e]``, cast back
to the layer's dtype, before the routing weight). The scale is an ``[E, H]`` tensor (the
``norm`` role); eps is read off the region's ``rms_norm`` calls, or off a small constant the
region adds (a hand-written ``x * rsqrt(mean(x^2) + eps)``). The norm is a step after the
projections, row by row: the traced epilogue kernel (``lowering/epilogue.py``) runs these
experts (the reference too)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import FormFamily, register_form

_RMS_NORMS = ("rms_norm",)
_ADDS = ("add", "__add__", "__radd__")


class ExpertOutputNorm(FormFamily):
    name = "expert_norm"
    order = 30
    doc = "an MLP then a per-expert RMSNorm"
    vector_roles = {"norm": "H"}
    projections_only = False
    rowwise_after = True  # rms_norm over each row, times that row's expert's scale

    def constants(self, nodes):
        """eps candidates: those of the region's ``rms_norm`` calls, then small float
        constants it adds; ``None`` (``rms_norm``'s default) when it has neither."""
        norms, adds = [], []
        for n in nodes:
            name = str(getattr(n.target, "__name__", n.target))
            if name in _RMS_NORMS:
                eps = n.kwargs.get("eps", n.args[3] if len(n.args) > 3 else None)
                if isinstance(eps, float) and eps not in norms:
                    norms.append(eps)
            elif name in _ADDS:
                for v in n.args:
                    if isinstance(v, float) and 0.0 < v < 1e-2 and v not in adds:
                        adds.append(v)
        found = norms + [a for a in adds if a not in norms]
        return found[:4] or [None]

    def propose(self, layout, epss):
        if layout.vector_roles != ("norm",):
            return
        yield from self.forms_of(layout, ((("eps", eps),) for eps in epss))

    def after(self, form, y, p):
        w = p["norm"]
        normed = F.rms_norm(y.float(), (y.shape[-1],), eps=form.option("eps"))
        return (normed * w.float()).to(y.dtype)

    def describe(self, form):
        eps = form.option("eps")
        return ["rmsnorm per expert" + (f", eps {eps:g}" if eps is not None else "")]


register_form(ExpertOutputNorm())

__all__ = ["ExpertOutputNorm"]
