"""Softcapped SwiGLU (Inkling-2): ``cap(g, c) = tanh(g / c) * c``; the gated product is
``cap(g, c_gate) * sigmoid(g) * cap(up, c_up)``, in float32, cast back. The caps are read off
the float divisors the expert region's code holds."""

from __future__ import annotations

import torch

from .base import ExpertForm, FormFamily, register_form


class SoftcappedSwiGLU(FormFamily):
    name = "softcap"
    order = 10
    doc = "softcapped SwiGLU"

    def claims(self, form):
        return form.softcap is not None

    def constants(self, nodes):
        """(gate, up) softcap pairs from the float divisors the region's code holds
        (``tanh(x / c) * c``); candidates only."""
        divs = []
        for n in nodes:
            name = str(getattr(n.target, "__name__", n.target))
            if name in ("truediv", "div", "__truediv__") and len(n.args) > 1:
                v = n.args[1]
                if (
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and v > 0
                    and v not in divs
                ):
                    divs.append(float(v))
        return [(a, b) for a in divs[:4] for b in divs[:4]]

    def propose(self, layout, caps):
        if not layout.gated:
            return
        for cap in caps:
            for gf in layout.gate_firsts:
                yield ExpertForm(layout.roles, "silu", layout.transposed, gf, True, softcap=cap)

    def gate(self, form, g, u, act, inplace):
        cg, cu = form.softcap
        gf, uf = g.float(), u.float()
        inner = torch.tanh(gf / cg) * cg * torch.sigmoid(gf) * (torch.tanh(uf / cu) * cu)
        return inner.to(g.dtype)

    def activation(self, form):
        return None

    def describe(self, form):
        return ["softcap {:g}/{:g}".format(*form.softcap)]


register_form(SoftcappedSwiGLU())
