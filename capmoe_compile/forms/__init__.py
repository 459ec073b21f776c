"""Expert forms, one registry: :class:`ExpertForm` (how one expert computes from its
parameters) and the families that propose and compute them (``base.py``).

Each file here is one family of forms and registers it; a family's ``order`` says where its
candidates come among the others'. A new family is one file plus its test
(``docs/extending.md``, "A new expert form")."""

from __future__ import annotations

from . import clamped, expert_norm, glu, low_precision, shared_norm, softcap  # noqa: F401
from .activations import ACTIVATIONS, apply_inplace, register_activation
from .base import ExpertForm, FormFamily, Layout, candidates, families, layouts, register_form

__all__ = [
    "ACTIVATIONS",
    "ExpertForm",
    "FormFamily",
    "Layout",
    "apply_inplace",
    "candidates",
    "families",
    "layouts",
    "register_activation",
    "register_form",
]
