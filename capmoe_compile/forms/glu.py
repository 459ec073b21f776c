"""The gated MLP (``act(gate) * up``: SwiGLU, GeGLU, ReGLU, ...) and the plain MLP
(``act(up)``), with or without biases, for every registered activation. Registered first: a
form built without naming a family, and claimed by no other, is this family's."""

from __future__ import annotations

from .activations import ACTIVATIONS
from .base import ExpertForm, FormFamily, register_form


class GatedOrPlainMLP(FormFamily):
    name = "mlp"
    order = 0
    doc = "SwiGLU/GLU/MLP; silu/gelu/relu/relu2"

    def propose(self, layout, consts):
        for act in ACTIVATIONS:
            for gf in layout.gate_firsts:
                yield ExpertForm(layout.roles, act, layout.transposed, gf, True)


register_form(GatedOrPlainMLP())
