"""Clamped / scaled gating (GPT-OSS, DeepSeek-V4, GLM-5-next, Step-3.5): gate and up either
halves of gate_up or alternating columns of it (``interleaved``), the gate clamped to at most
``limit`` and up to [-limit, limit], the activation ``g * sigmoid(alpha * g)`` (``silu`` when
alpha is 1) times ``up + up_shift``. Limits and alphas are read off the clamp bounds and float
factors the expert region's code holds."""

from __future__ import annotations

import torch

from .base import ExpertForm, FormFamily, register_form


class ClampedGating(FormFamily):
    name = "clamped"
    order = 20
    doc = "clamped/interleaved GPT-OSS gating"

    def claims(self, form):
        return (
            form.interleaved or form.limit is not None or form.alpha != 1.0 or bool(form.up_shift)
        )

    def constants(self, nodes):
        """Clamp limits and gate scales the region's own code holds, as (limit, alpha) pairs
        (GPT-OSS: ``clamp(max=7)``, ``sigmoid(g * 1.702)``). Only candidates: a form built
        from them passes only if it reproduces the region."""
        limits: set[float | None] = {None}
        alphas: set[float] = {1.0}
        for n in nodes:
            name = str(getattr(n.target, "__name__", n.target))
            if name in ("clamp", "clip", "clamp_max"):
                for v in (*n.args[1:], *n.kwargs.values()):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        limits.add(abs(float(v)))
            elif name in ("mul", "__mul__"):
                for v in n.args:
                    if isinstance(v, float) and v not in (0.0, 1.0):
                        alphas.add(v)
        # The region's own constants first: a trial whose activations never reach a clamp
        # cannot tell a clamped form from an unclamped one (the "large" trial tries to), and
        # the form built from what the code holds is the faithful one.
        out = [
            (lim, a)
            for lim in sorted(limits, key=lambda v: 0 if v is None else -v)
            for a in sorted(alphas, key=lambda v: v == 1.0)
        ]
        return out[:16]  # a handful of constants in any real expert

    def propose(self, layout, gates):
        if not layout.gated:
            return
        fused = "gate_up" in layout.weights
        for limit, alpha in gates:
            for inter in (False, True) if fused else (False,):
                for shift in (0.0, 1.0):
                    if limit is None and alpha == 1.0 and not inter and not shift:
                        continue  # the plain gated form (forms/glu.py)
                    for gf in layout.gate_firsts:
                        yield ExpertForm(
                            layout.roles,
                            "silu",
                            layout.transposed,
                            gf,
                            True,
                            inter,
                            limit,
                            alpha,
                            shift,
                        )

    def gate(self, form, g, u, act, inplace):
        if form.limit is not None:
            g = g.clamp(max=form.limit)
            u = u.clamp(min=-form.limit, max=form.limit)
        a = g * torch.sigmoid(g * form.alpha) if form.alpha != 1.0 else act(g)
        return a * (u + form.up_shift) if form.up_shift else a * u

    def activation(self, form):
        return None

    def describe(self, form):
        extra = []
        if form.interleaved:
            extra.append("interleaved")
        if form.limit is not None:
            extra.append(f"limit {form.limit:g}")
        if form.alpha != 1.0:
            extra.append(f"alpha {form.alpha:g}")
        if form.up_shift:
            extra.append(f"up+{form.up_shift:g}")
        return extra


register_form(ClampedGating())
