"""Expert parallelism (EP) over ``torch.distributed``: see ``README.md`` in this folder.

Design, in one paragraph. :func:`expert_parallel` finds the model's MoE layers the way the
compile passes do, by tracing one call (``explain``): whatever their attribute names, router
or forward signature, a layer is sharded when the passes matched and verified it (its expert
form checked by running it) and its expert weights are parameters of the model (stacked
``[E, ...]``, or per-expert modules). Rank ``r`` keeps its experts ``[r*E/W, (r+1)*E/W)`` in
the layer's :class:`EPLayer`; the model's parameters keep their shapes but no longer their
memory (a stride-0 view of one element), so Dynamo traces the model's code as before. The passes recognise the sharded
parameters (``pipeline.known_form``: nothing to verify again on weights that are gone) and the
EP lowering (``lowering.py``) replaces the layer's experts by all-to-all dispatch, this rank's
experts and combine, with capacity over the whole group's tokens.

Eagerly, a sharded layer runs only where its experts module has the transformers calling
convention ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` (checked by
running it before sharding): its forward then calls ``capmoe::ep_experts`` (capacity off).
Any other sharded layer raises when called eagerly: it runs compiled with ``backend="capmoe"``.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import ops, pipeline, telemetry
from ..experts import ExpertForm, moe_experts_reference
from ..replicas import Placement, assign_copies
from . import group as grp
from .group import EPInfo, EPLayer

log = logging.getLogger("capmoe_compile")

DISPATCHES = ("auto", "opaque")


# ---------------------------------------------------------------------------------------------
# sharding


def expert_parallel(
    model: torch.nn.Module,
    group=None,
    *,
    example_inputs: Any = None,
    filter_fn: Callable[[torch.nn.Module | None, str], bool] | None = None,
    dispatch: str = "auto",
    placement: Any = None,
) -> torch.nn.Module:
    """Shard the routed experts of ``model``'s MoE layers across ``group``, in place.

    The layers are found by tracing one call of ``model`` on ``example_inputs`` (a tuple of
    positional arguments, a dict of keyword arguments, or one tensor; default: the model's
    ``dummy_inputs``, as transformers models have) through the capmoe passes: every layer the
    passes match and verify is sharded if its expert weights are parameters of the model
    (stacked ``[E, ...]`` tensors, or one module per expert) and ``E`` is a multiple of the
    group size. ``filter_fn(module, name)`` chooses
    among them (``name``: the layer's path as ``explain`` prints it, ``module``: that
    submodule or None). Layers left replicated are logged with their reason.

    Rank ``r`` of ``W`` keeps experts ``[r*E/W, (r+1)*E/W)``; routers, shared experts,
    attention and everything else stay replicated. Compiled with ``backend="capmoe"``, the
    layers route with capacity over the whole group's tokens. Every rank must call this on the
    same model, in the same order, and then run the same forward passes (each on its own
    tokens). Returns ``model``.

    ``dispatch``: ``"auto"`` (default) compiles a layer whose options at compile time have
    capacity on (batch scope, no padding mask) into static-shaped functional collectives in the
    graph (``functional.py``); such a graph bakes ``C`` and the ranks' token counts in and
    raises if they change (recompile with ``torch._dynamo.reset()``). ``"opaque"`` always uses
    the ``capmoe::ep_moe`` op (data-dependent splits; options resolved at every call).

    ``placement``: SPEC.md's "Redundant expert copies". A
    :class:`~capmoe_compile.replicas.Placement` (every sharded layer), a mapping from layer
    name (as ``explain`` and ``record_stats`` name it) to a ``Placement`` or its dict, a
    :class:`capmoe_compile.plan.Plan`, or the path of a plan JSON (``capmoe plan``). A layer
    with a placement keeps on rank ``r`` the weights of every copy ``p`` with
    ``rank_of[p] == r`` (an expert copied onto two ranks has its weights on both; ``E`` need
    not divide by the group size), routes with capacity per copy
    ``C = ceil(gamma * T * k / (E + R))`` and every policy on copies, and always runs the
    opaque op. Layers a mapping does not name are sharded as without it. Every rank must
    pass the same placements.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"expert_parallel: dispatch={dispatch!r}, expected one of {DISPATCHES}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed.init_process_group first")
    if any(getattr(p, "_capmoe_ep_key", None) is not None for p in model.parameters()):
        raise ValueError("expert_parallel: the model is already sharded")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    chosen, left = [], []
    found = _discover(model, example_inputs)
    placements = _placements(placement, [r.name for r in found if r.matched])
    for r in found:
        module = _submodule(model, r.name)
        if filter_fn is not None and not filter_fn(module, r.name):
            continue
        pl = placements.get(r.name)
        why = r.reason if not r.matched else _why_not_shardable(r, names, world, pl)
        (left if why else chosen).append((r, why))
    if not chosen:
        reasons = "; ".join(f"{r.name}: {why}" for r, why in left) or "no MoE layer found"
        raise ValueError(f"expert_parallel: no layer can be sharded ({reasons})")
    for r, why in left:
        log.warning("capmoe EP: %s stays replicated: %s", r.name, why)
    for r, _ in chosen:
        pl = placements.get(r.name)
        if pl is None:
            n_local = r.num_experts // world
            info = EPInfo(group, rank, world, r.num_experts, rank * n_local, n_local)
        else:
            info = EPInfo(group, rank, world, r.num_experts, -1, pl.rank_of.count(rank))
        _shard(model, r, [names[id(p)] for p in r.params], info, dispatch, pl)
    return model


def _placements(placement: Any, layer_names: list[str]) -> dict[str, Placement]:
    """``expert_parallel``'s ``placement`` argument as {layer name: Placement}."""
    if placement is None:
        return {}
    if isinstance(placement, Placement):
        return dict.fromkeys(layer_names, placement)
    if isinstance(placement, (str, bytes)) or hasattr(placement, "__fspath__"):
        from ..plan import Plan

        placement = Plan.load(placement)
    layers = getattr(placement, "layers", placement)  # a plan.Plan: its per-layer dicts
    out = {}
    for name, v in dict(layers).items():
        if isinstance(v, dict) and "placement" in v:
            v = v["placement"]
        out[name] = v if isinstance(v, Placement) else Placement.from_dict(v)
    unknown = sorted(set(out) - set(layer_names))
    if unknown:
        raise ValueError(
            f"expert_parallel: placement names layers the passes did not find: {unknown} "
            f"(found: {layer_names})"
        )
    return out


def _discover(model: torch.nn.Module, example_inputs: Any) -> list:
    """The passes' report of every router-like site of one traced call (``explain``)."""
    from ..explain import explain

    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None)
        if example_inputs is None:
            raise ValueError(
                "expert_parallel: pass example_inputs=(...) (one call's arguments): the MoE "
                "layers are found by tracing the model once"
            )
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    report = explain(model, capacity_factor=None)(*args, **kwargs)
    return report.layers + report.unmatched


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _why_not_shardable(r, names: dict[int, str], world: int, pl: Placement | None = None) -> str:
    if r.form is None or not r.params:
        return "the passes recorded no verified expert form"
    if any(id(p) not in names for p in r.params):
        return "its expert weights are not parameters of the model (buffers or computed)"
    if r.form.shared_roles:  # one tensor for every expert: not to be split by expert
        return f"its experts share {', '.join(r.form.shared_roles)} (not built for EP)"
    if r.form.stacked and any(p.shape[0] != r.num_experts for p in r.params):
        return "its stacked expert parameters do not all have E rows"
    if not r.form.stacked and len(r.params) != r.num_experts * len(r.form.roles):
        return "its per-expert parameters are not one set per expert"
    if pl is not None:
        if pl.num_experts != r.num_experts:
            return f"its placement is for E={pl.num_experts} experts, the layer has {r.num_experts}"
        if pl.num_ranks > world:
            return f"its placement uses {pl.num_ranks} ranks, the group has {world}"
        return ""
    if r.num_experts % world:
        return f"E={r.num_experts} experts, not divisible by the group's {world} ranks"
    return ""


def _shard(model, r, qualnames: list[str], info: EPInfo, dispatch: str, pl=None) -> None:
    """Keep this rank's experts (or, with a placement, its copies) of layer ``r`` in its
    EPLayer; free the model's copies."""
    if pl is None:
        held = list(range(info.first_expert, info.first_expert + info.num_local))
    else:  # the logical expert of each copy on this rank, in ascending copy id
        held = [e for e, rk in zip(pl.expert_of, pl.rank_of, strict=True) if rk == info.rank]
    if r.form.stacked:  # [E, ...] tensors: this rank's rows of each
        idx = torch.tensor(held, dtype=torch.int64)
        local = [p.detach().index_select(0, idx).clone() for p in r.params]
    else:  # per-expert modules (nn.ModuleList): this rank's experts' tensors
        n = len(r.form.roles)
        local = [r.params[e * n + i].detach().clone() for e in held for i in range(n)]
    layer = EPLayer(r.name, info, r.form, local, tuple(qualnames), dispatch, placement=pl)
    key = grp.register(layer)
    owner_name = _common_module(qualnames)
    owner = model.get_submodule(owner_name) if owner_name else model
    eager = _has_experts_convention(owner, r.params, r.form)
    for p in r.params:
        # Shape kept (Dynamo traces the model's own code as before), memory gone: every
        # element reads one NaN. The EP lowering never reads it; code that still would (a
        # layer the compiled graph did not rewrite) computes NaN, never a plausible number.
        fill = float("nan") if p.dtype.is_floating_point else 0
        p.data = torch.full((), fill, dtype=p.dtype, device=p.device).expand(p.shape)
        p._capmoe_ep_key = key
    owner._capmoe_ep = info
    owner._capmoe_ep_key = key
    if eager:
        owner._capmoe_ep_params = tuple(n.rsplit(".", 1)[-1] for n in qualnames)
        owner.forward = types.MethodType(_ep_experts_forward, owner)
        return
    # Everything that could run the layer's own code eagerly refuses to: the layer, the
    # module(s) holding the expert weights (e.g. each expert of an nn.ModuleList).
    guarded = [_submodule(model, r.name) or model, owner]
    guarded += [model.get_submodule(n.rpartition(".")[0]) for n in qualnames if "." in n]
    for module in {id(m): m for m in guarded}.values():
        module.register_forward_pre_hook(_compiled_only(r.name))


def _common_module(qualnames: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in qualnames]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.no_grad()
def _has_experts_convention(owner, params: list[torch.Tensor], form: ExpertForm) -> bool:
    """Whether ``owner(x, ids, weights)`` computes the experts of ``form`` (the transformers
    experts-module convention), checked by running it on random selections."""
    own = list(owner.parameters(recurse=False))
    if (
        not form.stacked
        or len(own) != len(params)
        or any(all(p is not q for q in own) for p in params)
    ):
        return False
    down = params[form.roles.index("down")]
    H = down.shape[-1] if "down" in form.transposed else down.shape[-2]
    E = params[0].shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, H, generator=gen).to(params[0].dtype)
    ids = torch.rand(6, E, generator=gen).argsort(-1)[:, : min(2, E)]
    w = torch.rand(ids.shape, generator=gen).to(params[0].dtype)
    try:
        got = owner(x, ids, w)
    except Exception:  # noqa: BLE001 - any other signature: not the convention
        return False
    want = moe_experts_reference(x, ids, w, params, form)
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-3)
    )


def _compiled_only(name: str):
    def check(module, args):
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                f"capmoe EP: layer {name} is sharded by expert_parallel: run the model compiled "
                "with backend='capmoe' (its own code would read experts this rank no longer holds)"
            )

    return check


def _ep_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    params = [getattr(self, n) for n in self._capmoe_ep_params]
    return ep_experts_op(hidden_states, top_k_index, top_k_weights, params, self._capmoe_ep_key)


def sharded_form(params: list[torch.Tensor]) -> ExpertForm | None:
    """The form verified before sharding, for the passes (``pipeline.known_form``)."""
    key = getattr(params[0], "_capmoe_ep_key", None) if params else None
    return None if key is None else grp.get(key).form


# ---------------------------------------------------------------------------------------------
# dispatch, local experts, combine


def dispatch_compute_combine(
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    layer: EPLayer,
    clock: grp.Clock,
    copy_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) with experts spread over the group:
    counts exchange, all-to-all of (token, expert) rows to the experts' owners, local grouped
    GEMMs, all-to-all back, weighted combine here. Sentinel ids (>= E) are never sent. With
    ``copy_ids`` (a layer with a placement) each pair goes to the rank of its copy, and
    computes there with that copy's weights (sentinel ``E'``: never sent)."""
    info, form = layer.info, layer.form
    T, H = x.shape
    E, W = info.num_experts, info.world
    flat = ids.reshape(-1).long()
    fw = w.reshape(-1)
    tok = torch.arange(flat.numel(), device=x.device) // max(ids.shape[1], 1)
    if copy_ids is not None:  # SPEC's copies: the pair goes to its copy's rank
        rank_of, local_index = layer.copy_tables()
        Ep = layer.placement.num_copies
        cflat = copy_ids.reshape(-1).long()
        real = cflat < Ep
        cflat, fw, tok = cflat[real], fw[real], tok[real]
        order = torch.argsort(rank_of[cflat], stable=True)  # by the copy's rank
        cflat, fw, tok = cflat[order], fw[order], tok[order]
        dest = rank_of[cflat]
        send_e = local_index[cflat]
    else:
        real = flat < E
        flat, fw, tok = flat[real], fw[real], tok[real]
        order = torch.argsort(flat, stable=True)  # by owner rank, then expert
        flat, fw, tok = flat[order], fw[order], tok[order]
        dest = info.owner(flat)
        send_e = flat - dest * info.num_local
    send_counts = torch.bincount(dest, minlength=W)
    recv_counts = torch.empty_like(send_counts)
    with clock.part("comm_s"):
        dist.all_to_all_single(recv_counts, send_counts, group=info.group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    n_recv = sum(recv_splits)
    send_x = x[tok]
    recv_x = x.new_empty(n_recv, H)
    recv_e = send_e.new_empty(n_recv)
    with clock.part("comm_s"):
        dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=info.group)
        dist.all_to_all_single(recv_e, send_e, recv_splits, send_splits, group=info.group)
    with clock.part("compute_s"):
        y = grp.apply_local_experts(recv_x, recv_e, layer.local, form) if n_recv else recv_x
    clock.t.recv_rows += n_recv
    back = x.new_empty(tok.numel(), H)
    with clock.part("comm_s"):
        dist.all_to_all_single(back, y.contiguous(), send_splits, recv_splits, group=info.group)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, back.float() * fw.float()[:, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# the layer ops


@torch.library.custom_op("capmoe::ep_experts", mutates_args=())
def ep_experts_op(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: list[torch.Tensor],
    key: int,
) -> torch.Tensor:
    """The sharded experts of EP layer ``key`` on the model's own selection (no capacity).
    ``params`` are the model's (emptied) expert parameters: they mark the layer for the passes;
    the rank's experts are the layer's own."""
    layer = grp.get(key)
    clock = grp.Clock(layer.name)
    fp = grp.fingerprint([layer.name, layer.form.to_str(), "eager", _placement_key(layer)])
    header = torch.tensor([x.shape[0], fp])
    with clock.part("comm_s"):
        got = grp.check_agreement(layer.info, header, f"layer {layer.name}")
    cid = None
    if layer.placement is not None:  # pair order is the group's: gather the selections
        counts = got[:, 0].tolist()
        with clock.part("comm_s"):
            g_ids = grp.all_gather_rows(layer.info, ids.long(), counts)
        off = sum(counts[: layer.info.rank])
        cid = assign_copies(g_ids, layer.placement)[off : off + x.shape[0]]
    out = dispatch_compute_combine(x, ids, weights, layer, clock, cid)
    clock.done()
    return out


@ep_experts_op.register_fake
def _ep_experts_fake(x, ids, weights, params, key):
    return torch.empty_like(x)


@torch.library.custom_op("capmoe::ep_moe", mutates_args=())
def ep_moe_op(
    x: torch.Tensor,
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    layer: int,
    key: int,
    num_sequences: int,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """A rewritten EP layer: capacity over the group's tokens, then dispatch/compute/combine.

    ``layer`` indexes the pipeline's layer handles (options, resolved now), ``key`` the EP
    layers."""
    h = pipeline.layer(layer)
    ep = grp.get(key)
    opts = h.options()
    clock = grp.Clock(h.name)
    T = x.shape[0]
    valid = None
    if opts["exclude_padding"] and opts["capacity_factor"]:
        valid = ops.padding_rows(attention_mask, T, num_sequences)
    ops.check_sequence_scope(opts, num_sequences, h.name)
    fp = grp.fingerprint(
        [
            ep.name,
            ep.form.to_str(),
            grp.options_fingerprint(opts),
            valid is not None,
            _placement_key(ep),
        ]
    )
    header = torch.tensor([T, fp, max(num_sequences, 1), int(telemetry.is_recording())])
    with clock.part("comm_s"):
        got = grp.check_agreement(ep.info, header, f"layer {h.name}")
    counts, seqs = got[:, 0].tolist(), got[:, 2].tolist()
    # The group's routing metadata is gathered when capacity is on, or when any rank records
    # telemetry (loads of the whole group); every rank decides alike from the header.
    cid = None
    if ep.placement is not None:  # copies: every rank assigns the group's pairs alike
        out_ids, out_w, cid = _route_in_group(
            probs, ids, weights, valid, ep, h, opts, counts, seqs, clock
        )
    elif opts["capacity_factor"] is None and not any(got[:, 3].tolist()):
        out_ids, out_w = ids.long(), weights
    else:
        out_ids, out_w = _route_in_group(
            probs, ids, weights, valid, ep, h, opts, counts, seqs, clock
        )
    out = dispatch_compute_combine(x, out_ids, out_w, ep, clock, cid)
    clock.done()
    return out


def _route_in_group(probs, ids, weights, valid, ep, h, opts, counts, seqs, clock):
    """This rank's rows of the policy applied to the group's routing metadata."""
    info = ep.info
    T, k, E = ids.shape[0], ids.shape[1], probs.shape[1]
    off = sum(counts[: info.rank])
    cols = [probs.double(), ids.double(), weights.double()]
    if valid is not None:
        cols.append(valid.double()[:, None])
    with clock.part("comm_s"):
        g = grp.all_gather_rows(info, torch.cat(cols, 1), counts)
    gP = g[:, :E].to(probs.dtype)
    g_ids = g[:, E : E + k].long()
    gW = g[:, E + k : E + 2 * k].to(weights.dtype)
    g_valid = None if valid is None else g[:, E + 2 * k] > 0.5
    rank_of_row = torch.repeat_interleave(torch.arange(info.world), torch.tensor(counts))
    g_cid = None
    with clock.part("route_s"):
        if ep.placement is not None:
            g_out_i, g_out_w, g_cid = grp.route_group_copies(
                gP, g_ids, gW, rank_of_row, ep.placement, opts, counts, seqs, g_valid
            )
        else:
            g_out_i, g_out_w = grp.route_group(
                gP, g_ids, gW, rank_of_row, info, opts, counts, seqs, g_valid
            )
    if opts["capacity_factor"] is None:
        g_out_i, g_out_w = g_ids, gW
    if telemetry.is_recording():
        nseq = sum(seqs) if opts["capacity_scope"] == "sequence" else 1
        per_seq = {c // max(s, 1) for c, s in zip(counts, seqs, strict=True)}
        if opts["capacity_scope"] == "sequence" and len(per_seq) > 1:
            nseq = 1  # unequal sequence lengths across ranks: report as one group
        telemetry.record(h.name, g_ids, g_out_i, info.num_experts, opts, g_valid, nseq)
    if g_cid is not None:
        return g_out_i[off : off + T], g_out_w[off : off + T], g_cid[off : off + T]
    return g_out_i[off : off + T], g_out_w[off : off + T]


def _placement_key(layer: EPLayer):
    return None if layer.placement is None else layer.placement.to_dict()


@ep_moe_op.register_fake
def _ep_moe_fake(x, probs, ids, weights, layer, key, num_sequences, mask):
    return torch.empty_like(x)
