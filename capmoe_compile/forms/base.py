""":class:`ExpertForm` (how one expert computes) and the registry of form families.

A *form family* (:class:`FormFamily`) is one way experts compute between and after their
projections: the gated or plain MLP with an activation, GPT-OSS's clamped gating, Inkling-2's
softcaps, ... . A family proposes candidate forms for a layer from the layouts its parameter
shapes admit (:func:`layouts`) and from constants the layer's own code holds, and gives the
body of the forms it owns. The passes try every family's candidates (:func:`candidates`) and
keep a form only if it reproduces the layer; nothing outside a family names it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .activations import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class ExpertForm:
    """How one expert computes. ``roles`` names each per-expert tensor, in ``params`` order.

    Roles: ``gate_up`` (fused, gated: split in halves), ``gate`` and ``up`` (separate, gated),
    ``up`` alone (plain MLP), ``down``; biases ``b_<role>``; and vector roles a family adds
    (:attr:`FormFamily.vector_roles`). ``transposed`` lists the weight roles stored as
    [in, out] instead of nn.Linear's [out, in].
    """

    roles: tuple[str, ...]
    act: str
    transposed: tuple[str, ...] = ()
    gate_first: bool = True  # for gate_up: which half is the gate
    stacked: bool = True  # params carry a leading expert dim; else per-expert concatenation
    # Clamped / scaled gating (GPT-OSS, ``forms/clamped.py``): gate and up alternate columns
    # of gate_up (``interleaved``), the gate is clamped to at most ``limit`` and up to
    # [-limit, limit], the activation is ``g * sigmoid(alpha * g)`` (act "silu" only) and
    # multiplies ``up + up_shift``. The defaults are the plain gated MLP.
    interleaved: bool = False
    limit: float | None = None
    alpha: float = 1.0
    up_shift: float = 0.0
    # Softcapped SwiGLU (Inkling-2, ``forms/softcap.py``): (c_gate, c_up)
    softcap: tuple[float, float] | None = None
    # How the weighted expert outputs are summed (bf16/fp16 layers; float32 is exact either
    # way): "float32": in float32, rounded once (the default); "dtype": as the common eager
    # loop does (``out.index_add_(0, rows, expert(x) * w)`` over experts in id order): each
    # product rounded to the layer's dtype and added in that dtype, experts in ascending id
    # order. The verifier picks the one that reproduces the layer's own rounding.
    combine: str = "float32"
    # The family that computes this form (a registered :class:`FormFamily`'s name); "" picks
    # the family that claims the fields above (the plain gated/MLP family if none does).
    family: str = ""
    # Parameters of the family beyond the fields above, as sorted (name, value) pairs.
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Decided once: Dynamo tracing a call that takes a form as an input would make its
        # float fields symbolic under dynamic=True (and restart to specialise them) if the
        # plain case read them.
        fam = _family_of(self)
        object.__setattr__(self, "family", fam.name)
        object.__setattr__(self, "_family", fam)

    @property
    def gated(self) -> bool:
        return "gate_up" in self.roles or "gate" in self.roles

    @property
    def activation(self) -> str | None:
        """The one elementwise activation between the projections (``act(gate) * up`` or
        ``act(up)``), which is all a fused kernel needs to know; None when the family
        computes something else there (clamps, scales, softcaps)."""
        return self._family.activation(self)

    @property
    def projections_only(self) -> bool:
        """Whether the expert is exactly :meth:`mlp` over its projections (kernels built on
        ``mlp(x, project)`` run it); False where the family adds a step of its own after
        them (the reference computes those; the traced epilogue kernel too where that step
        is row-wise, :attr:`FormFamily.rowwise_after`)."""
        return self._family.projections_only

    @property
    def rowwise_after(self) -> bool:
        """See :attr:`FormFamily.rowwise_after`."""
        return self._family.rowwise_after

    @property
    def vector_roles(self) -> tuple[str, ...]:
        """This form's roles that are its family's vectors (not weights, not biases), per
        expert (``[E, n]``) or shared (:attr:`shared_roles`)."""
        return tuple(r for r in self.roles if r in self._family.vector_roles)

    def after(self, y: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The family's step after the down projection (:meth:`FormFamily.after`)."""
        return self._family.after(self, y, p)

    def option(self, name: str, default: Any = None) -> Any:
        """A family parameter of :attr:`extra`."""
        return dict(self.extra).get(name, default)

    def to_str(self) -> str:
        d = dataclasses.asdict(self)
        d["extra"] = [list(p) for p in self.extra]
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_str(s: str) -> ExpertForm:
        d = json.loads(s)
        return ExpertForm(
            roles=tuple(d["roles"]),
            act=d["act"],
            transposed=tuple(d["transposed"]),
            gate_first=d["gate_first"],
            stacked=d["stacked"],
            interleaved=d.get("interleaved", False),
            limit=d.get("limit"),
            alpha=d.get("alpha", 1.0),
            up_shift=d.get("up_shift", 0.0),
            softcap=tuple(d["softcap"]) if d.get("softcap") else None,
            combine=d.get("combine", "float32"),
            family=d.get("family", ""),
            extra=tuple(tuple(p) for p in d.get("extra", ())),
        )

    def describe(self) -> str:
        kind = "swiglu" if self.gated and self.act == "silu" else ("glu" if self.gated else "mlp")
        bias = "+bias" if any(r.startswith("b_") for r in self.roles) else ""
        extra = self._family.describe(self)
        return f"{kind}({self.act}){bias}" + (f"[{', '.join(extra)}]" if extra else "")

    @property
    def shared_roles(self) -> tuple[str, ...]:
        """Roles of one tensor every expert reads (``shared_<name>``, no expert dimension: a
        norm scale applied after each expert); stacked forms only."""
        return tuple(r for r in self.roles if is_shared_role(r))

    def expert_params(self, params: list[torch.Tensor], e: int) -> dict[str, torch.Tensor]:
        n = len(self.roles)
        if self.stacked:
            ps = [p if is_shared_role(r) else p[e] for r, p in zip(self.roles, params, strict=True)]
        else:
            ps = params[e * n : (e + 1) * n]
        return dict(zip(self.roles, ps, strict=True))

    def num_experts(self, params: list[torch.Tensor]) -> int:
        if not self.stacked:
            return len(params) // len(self.roles)
        return next(
            p for r, p in zip(self.roles, params, strict=True) if not is_shared_role(r)
        ).shape[0]

    def mlp(
        self,
        x: torch.Tensor,
        project: Callable[[str, torch.Tensor], torch.Tensor],
        *,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        inplace: bool = False,
        split_dim: int = -1,
    ) -> torch.Tensor:
        """The expert MLP of this form: the one definition every path runs.

        ``project(role, h)`` is a path's projection (``h @ W_role + b_role`` for one expert,
        a grouped GEMM over many, a transposed product, ...); the form decides which
        projections run and how they combine: a fused gate/up split in halves along
        ``split_dim`` (``gate_first`` says which half gates), or separate gate and up, the
        family's gated product (:meth:`FormFamily.gate`; ``act``, default
        ``ACTIVATIONS[self.act]``; ``inplace``: into the activation's buffer), or a plain
        MLP; then down."""
        act = act or ACTIVATIONS[self.act]
        if "gate_up" in self.roles:
            h = project("gate_up", x)
            if self.interleaved:  # gate, up, gate, up, ... along split_dim
                pair = split_dim + 1 if split_dim >= 0 else split_dim
                a, b = h.unflatten(split_dim, (-1, 2)).unbind(pair)
            else:
                a, b = h.chunk(2, dim=split_dim)
            g, u = (a, b) if self.gate_first else (b, a)
        elif "gate" in self.roles:
            g, u = project("gate", x), project("up", x)
        else:
            return project("down", act(project("up", x)))
        return project("down", self._family.gate(self, g, u, act, inplace))

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """One expert on rows ``x`` [n, H]. A family that computes in a dtype of its own
        (:meth:`FormFamily.compute_dtype`) gets ``x`` and its tensors cast to it, and its
        result is cast back to ``x``'s dtype."""
        low = self._family.compute_dtype(self)
        if low is not None and low != x.dtype:
            cast = {r: v.to(low) for r, v in p.items()}
            return self._apply(x.to(low), cast).to(x.dtype)
        return self._apply(x, p)

    def _apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        def lin(role: str, h: torch.Tensor) -> torch.Tensor:
            w = p[role]
            b = p.get("b_" + role)
            if not self.stacked:
                # per-expert modules are nn.Linear: the bias added inside the product, rounded
                # once, as nn.Linear does (the reference is all that runs these experts)
                if role not in self.transposed:
                    return torch.nn.functional.linear(h, w, b)
                return h @ w if b is None else torch.addmm(b, h, w)
            # stacked: the product, then the bias, as the grouped kernels compute them
            y = h @ (w if role in self.transposed else w.t())
            return y if b is None else y + b

        return self._family.after(self, self.mlp(x, lin), p)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One reading of a layer's expert parameters (stacked ``[E, ...]``): which tensor has
    which role, which weights are stored transposed. ``vector_roles``: the non-bias vector
    roles of the reading (a family that does not name them proposes nothing for it)."""

    roles: tuple[str, ...]  # every tensor's role, in ``params`` order
    transposed: tuple[str, ...]
    weights: tuple[str, ...]  # the weight roles: (gate_up, down), (up, down), (gate, up, down)
    vector_roles: tuple[str, ...] = ()

    @property
    def gated(self) -> bool:
        return bool({"gate_up", "gate"} & set(self.weights))

    @property
    def gate_firsts(self) -> tuple[bool, ...]:
        """The ``gate_first`` values to try: both halves of a fused gate_up."""
        return (True, False) if "gate_up" in self.weights else (True,)


class FormFamily:
    """One family of expert forms. Subclass, set :attr:`name` and :attr:`doc`, override what
    differs, and :func:`register_form` an instance (``docs/extending.md``)."""

    #: the name forms carry (``ExpertForm.family``)
    name: str = ""
    #: where the family's candidates come among the others' (lowest first); the lowest is
    #: also the family of forms no family claims
    order: int = 100
    #: what the family covers, for the reason a layer no form reproduces is left
    doc: str = ""
    #: vector roles beyond biases, each with the size it must have: "H" (the hidden size);
    #: ``[E, n]`` tensors, or one ``[n]`` tensor every expert reads for a ``shared_`` role
    vector_roles: dict[str, str] = {}
    #: whether the expert is the MLP over its projections alone (see ExpertForm)
    projections_only: bool = True
    #: whether :meth:`after` also computes rows of different experts at once, given each
    #: vector role as one row per row of ``y`` (``[n, H]``, gathered by expert id): the traced
    #: epilogue kernel (``lowering/epilogue.py``) then runs the family's forms
    rowwise_after: bool = False

    def claims(self, form: ExpertForm) -> bool:
        """Whether a form built without naming a family is this family's (its fields are)."""
        return False

    def constants(self, nodes: list) -> Any:
        """What the family reads off the layer's code (FX nodes of the expert region), once
        per layer, for :meth:`propose`."""
        return None

    def propose(self, layout: Layout, consts: Any) -> Iterable[ExpertForm]:
        """Candidate forms of this family for one reading of the parameters."""
        return ()

    def forms_of(self, layout: Layout, extras: Iterable[tuple]) -> Iterator[ExpertForm]:
        """This family's stacked forms of ``layout``: one per ``extra`` (its parameters, see
        :attr:`ExpertForm.extra`), activation and gate half, in that order."""
        for extra in extras:
            for act in ACTIVATIONS:
                for gf in layout.gate_firsts:
                    yield ExpertForm(
                        layout.roles,
                        act,
                        layout.transposed,
                        gf,
                        True,
                        family=self.name,
                        extra=extra,
                    )

    def gate(self, form: ExpertForm, g, u, act, inplace: bool) -> torch.Tensor:
        """The gated product between the projections: ``act(g) * u``."""
        return act(g).mul_(u) if inplace else act(g) * u

    def after(self, form: ExpertForm, y: torch.Tensor, p: dict) -> torch.Tensor:
        """A step after the down projection (``p``: the expert's tensors by role)."""
        return y

    def compute_dtype(self, form: ExpertForm) -> torch.dtype | None:
        """The dtype the expert computes in whatever its input's (``None``: its input's); a
        family that names one sets ``projections_only = False`` (only the reference runs
        it)."""
        return None

    def activation(self, form: ExpertForm) -> str | None:
        """See :attr:`ExpertForm.activation`."""
        return form.act

    def describe(self, form: ExpertForm) -> list[str]:
        """Tags ``explain`` prints after the form's kind."""
        return []


_FAMILIES: list[FormFamily] = []


def register_form(family: FormFamily) -> FormFamily:
    """Add a form family. Candidates are proposed in the families' ``order``."""
    if not family.name or any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"a form family needs a new name (got {family.name!r})")
    _FAMILIES.append(family)
    _FAMILIES.sort(key=lambda f: f.order)
    return family


def families() -> tuple[FormFamily, ...]:
    return tuple(_FAMILIES)


def _family_of(form: ExpertForm) -> FormFamily:
    if form.family:
        for f in _FAMILIES:
            if f.name == form.family:
                return f
        raise ValueError(f"no form family named {form.family!r} is registered")
    claimed = [f for f in _FAMILIES if f.claims(form)]
    return claimed[0] if claimed else _FAMILIES[0]


def is_shared_role(role: str) -> bool:
    """Whether a role names one tensor read by every expert (see ExpertForm.shared_roles)."""
    return role.startswith("shared_")


def layouts(params: list[torch.Tensor], H: int, vector_roles: dict[str, str]) -> Iterator[Layout]:
    """Every reading of stacked parameters (leading dim E) as an MLP with hidden size ``H``:
    two or three ``[E, a, b]`` weights, ``[E, n]`` vectors as biases of the weights whose
    output size is ``n``, or as one of ``vector_roles`` of the size it names; ``[n]`` tensors
    as the ``shared_`` vector roles of their size."""
    mats = [i for i, p in enumerate(params) if p.dim() == 3]
    vecs = [i for i, p in enumerate(params) if p.dim() == 2]
    ones = [i for i, p in enumerate(params) if p.dim() == 1]
    shared = {r: s for r, s in vector_roles.items() if is_shared_role(r)}
    vector_roles = {r: s for r, s in vector_roles.items() if not is_shared_role(r)}
    if len(mats) not in (2, 3) or len(vecs) > len(mats) + len(vector_roles):
        return
    if len(mats) + len(vecs) + len(ones) != len(params) or len(ones) > len(shared):
        return
    shared_readings = [
        names
        for names in itertools.permutations(shared, len(ones))
        if all(
            params[i].shape[0] == H and shared[r] == "H" for i, r in zip(ones, names, strict=True)
        )
    ]
    if ones and not shared_readings:
        return
    for layout in _stacked_layouts(params, H, vector_roles, mats, vecs):
        for names in shared_readings or [()]:
            full = list(layout.roles)
            for i, r in zip(ones, names, strict=True):
                full[i] = r
            yield dataclasses.replace(
                layout, roles=tuple(full), vector_roles=layout.vector_roles + tuple(names)
            )


def _stacked_layouts(params, H, vector_roles, mats, vecs) -> Iterator[Layout]:
    role_sets = (
        [("gate_up", "down"), ("up", "down")] if len(mats) == 2 else [("gate", "up", "down")]
    )
    for roles in role_sets:
        for perm in itertools.permutations(mats):
            w = dict(zip(roles, (params[i].shape[1:] for i in perm), strict=True))
            tr_options = []
            for r in roles:
                a, b = w[r]
                ok = []
                if (b if r != "down" else a) == H:
                    ok.append(False)
                if (a if r != "down" else b) == H:
                    ok.append(True)
                tr_options.append(ok)
            for trs in itertools.product(*tr_options):
                size = {
                    "b_" + r: (w[r][1] if t else w[r][0]) for r, t in zip(roles, trs, strict=True)
                }
                size.update({r: H for r, s in vector_roles.items() if s == "H"})
                transposed = tuple(r for r, t in zip(roles, trs, strict=True) if t)
                # biases first: the readings without family roles come in the order of their
                # bias assignments alone
                for vroles in itertools.permutations(list(size), len(vecs)):
                    if any(
                        params[v].shape[1] != size[r] for v, r in zip(vecs, vroles, strict=True)
                    ):
                        continue
                    by_index = dict(zip(list(perm) + vecs, list(roles) + list(vroles), strict=True))
                    full = tuple(by_index.get(i, "") for i in range(len(params)))
                    extra = tuple(r for r in vroles if not r.startswith("b_"))
                    yield Layout(full, transposed, roles, extra)


def candidates(params: list[torch.Tensor], H: int, nodes: list) -> list[ExpertForm]:
    """Every registered family's candidate forms for stacked parameters (leading dim E), for
    each reading of them in turn (:func:`layouts`); ``nodes``: the expert region's code."""
    fams = families()
    consts = [f.constants(nodes) for f in fams]
    vector_roles: dict[str, str] = {}
    for f in fams:
        vector_roles.update(f.vector_roles)
    out: list[ExpertForm] = []
    for layout in layouts(params, H, vector_roles):
        for f, c in zip(fams, consts, strict=True):
            if set(layout.vector_roles) <= set(f.vector_roles):
                out.extend(f.propose(layout, c))
    return out
