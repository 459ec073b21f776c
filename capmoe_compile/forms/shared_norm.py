"""An MLP, then an RMSNorm of each expert's output with one scale ``s`` every expert shares
(transformers' MuseSpark: ``rms_norm(y * (1 + s))``, the scale applied before the norm, with
the product rounded to the layer's dtype in between). The scale is one ``[H]`` tensor (the
``shared_norm`` role, :func:`capmoe_compile.forms.base.is_shared_role`); the candidates cover
the scale before or after the norm, as ``s`` or ``1 + s``; eps is read as the ``expert_norm``
family reads it. The norm is row-wise: the traced epilogue kernel runs these experts."""

from __future__ import annotations

import torch.nn.functional as F

from .base import register_form
from .expert_norm import ExpertOutputNorm


class SharedOutputNorm(ExpertOutputNorm):
    name = "shared_norm"
    order = 31
    doc = "an MLP then an RMSNorm with one scale shared by every expert"
    vector_roles = {"shared_norm": "H"}
    projections_only = False
    rowwise_after = True

    def propose(self, layout, epss):
        if layout.vector_roles != ("shared_norm",):
            return
        extras = (
            (("before", before), ("eps", eps), ("offset", offset))
            for eps in epss
            for before in (True, False)
            for offset in (1.0, 0.0)
        )
        yield from self.forms_of(layout, extras)

    def after(self, form, y, p):
        scale = p["shared_norm"].float() + form.option("offset")
        eps = form.option("eps")
        if form.option("before"):
            scaled = (y.float() * scale).to(y.dtype).float()
            return F.rms_norm(scaled, (y.shape[-1],), eps=eps).to(y.dtype)
        normed = F.rms_norm(y.float(), (y.shape[-1],), eps=eps)
        return (normed * scale).to(y.dtype)

    def describe(self, form):
        eps = form.option("eps")
        s = "(1 + s)" if form.option("offset") else "s"
        where = f"rmsnorm(y * {s})" if form.option("before") else f"rmsnorm(y) * {s}"
        return [f"shared {where}" + (f", eps {eps:g}" if eps is not None else "")]


register_form(SharedOutputNorm())

__all__ = ["SharedOutputNorm"]
