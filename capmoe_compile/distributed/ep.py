"""Expert parallelism (EP) over ``torch.distributed``: see ``README.md`` in this folder.

Design, in one paragraph. :func:`expert_parallel` finds every MoE layer whose routed experts
are one module with stacked ``[E, ...]`` parameters and the transformers calling convention
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. *Before* sharding it
verifies the experts' form (which tensor is gate/up/down, transposed or not, activation) by
running the module's own forward on random selections against every candidate
:class:`~capmoe_compile.experts.ExpertForm`, exactly as the compile passes do. Then it keeps
rank ``r``'s slice ``[r*E/W, (r+1)*E/W)`` of every expert parameter and replaces the experts'
forward with a call to the ``capmoe::ep_experts`` op (all-to-all dispatch, local experts,
all-to-all combine; capacity off). The model therefore still runs eagerly, and Dynamo traces
the op instead of the model's expert code (which could no longer run on sharded weights). The
capmoe passes recognise the op in a layer's expert region, take the form recorded before
sharding (nothing to verify again on sharded weights) and rewrite the layer into
``capmoe::ep_moe``: gather the routing metadata of the whole EP group, apply the capacity
policy to the group's tokens (SPEC: under EP, ``T`` is the group's token count), keep this
rank's rows, dispatch, compute, combine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import types
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..experts import ExpertForm, moe_experts_reference
from ..lowering import grouped
from ..routing import _token_scale, capacity, route_reference, route_with_options


@dataclasses.dataclass(frozen=True)
class EPInfo:
    """How one MoE layer's routed experts are sharded."""

    group: Any  # the ProcessGroup (None: the default group)
    rank: int
    world: int
    num_experts: int  # E, global
    first_expert: int  # first global expert id held here
    num_local: int  # E / world

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(expert_ids, self.num_local, rounding_mode="floor")


@dataclasses.dataclass
class EPLayer:
    name: str
    info: EPInfo
    form: ExpertForm
    module: torch.nn.Module
    dispatch: str = "auto"  # "auto": static functional collectives where they apply
    compiled_as: str = ""  # what the passes chose last: "static" or "opaque: <why>"


#: Every EP layer, indexed by the ``key`` the ops carry.
_EP_LAYERS: list[EPLayer] = []


def layers() -> list[EPLayer]:
    return list(_EP_LAYERS)


# ---------------------------------------------------------------------------------------------
# sharding


def _stacked_params(experts: torch.nn.Module, E: int) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (n, p)
        for n, p in experts.named_parameters(recurse=False)
        if p.dim() >= 2 and p.shape[0] == E
    ]


@torch.no_grad()
def _verify_form(experts: torch.nn.Module, params: list[torch.Tensor], E: int) -> ExpertForm:
    """The form of ``experts``, found by running its own forward on random selections."""
    from ..passes.moe_layers import _candidate_forms, _close

    # The token width H: the dimension shared by the first and last projections.
    shapes = [tuple(p.shape[1:]) for p in params if p.dim() == 3]
    dims = [d for s in shapes for d in s]
    H = max(set(dims), key=lambda d: (sum(1 for s in shapes if d in s), -d))
    gen = torch.Generator().manual_seed(0)
    T, k = 12, min(2, E)
    dtype = params[0].dtype
    x = torch.randn(T, H, generator=gen).to(dtype)
    trials = []
    for _ in range(2):
        ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :k]
        w = torch.rand(T, k, generator=gen).to(dtype)
        trials.append((ids, w, experts(x, ids, w)))
    for form in _candidate_forms(params, H):
        try:
            if all(
                _close(moe_experts_reference(x, ids, w, params, form), ref)
                for ids, w, ref in trials
            ):
                return form
        except RuntimeError:
            continue
    raise ValueError(
        f"expert_parallel: the experts {type(experts).__name__} match no known expert form "
        "(SwiGLU/GLU/MLP with silu/gelu/relu); they cannot be sharded"
    )


DISPATCHES = ("auto", "opaque")


def expert_parallel(
    model: torch.nn.Module, group=None, *, dispatch: str = "auto"
) -> torch.nn.Module:
    """Shard every MoE layer's routed experts of ``model`` across ``group``, in place.

    Rank ``r`` of ``W`` keeps experts ``[r*E/W, (r+1)*E/W)`` (``E % W == 0`` is required);
    shared experts, routers, attention and everything else stay replicated. The layers keep
    working eagerly (all-to-all dispatch, no capacity) and, compiled with
    ``backend="capmoe"``, route with capacity over the whole group's tokens. Every rank must
    call this on the same model, in the same order, and then run the same forward passes
    (each on its own tokens). Returns ``model``.

    ``dispatch``: ``"auto"`` (default) compiles a layer whose options at compile time have
    capacity on (batch scope, no padding mask) into static-shaped functional collectives in the
    graph (``functional.py``); such a graph bakes ``C`` and the ranks' token counts in and
    raises if they change (recompile with ``torch._dynamo.reset()``). ``"opaque"`` always uses
    the ``capmoe::ep_moe`` op (data-dependent splits; options resolved at every call).
    """
    from ..testing import zoo

    if dispatch not in DISPATCHES:
        raise ValueError(f"expert_parallel: dispatch={dispatch!r}, expected one of {DISPATCHES}")

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed.init_process_group first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    found = zoo.moe_layers(model)
    if not found:
        raise ValueError("expert_parallel: no MoE layer found in the model")
    done = []
    for layer in found:
        experts = getattr(layer.block, "experts", None)
        E = layer.num_experts
        if experts is None or isinstance(experts, torch.nn.ModuleList):
            raise ValueError(
                f"expert_parallel: {layer.path} keeps its experts as separate modules; only "
                "stacked [E, ...] expert parameters (transformers 5 layout) are supported"
            )
        if getattr(experts, "_capmoe_ep", None) is not None:
            raise ValueError(f"expert_parallel: {layer.path} is already sharded")
        named = _stacked_params(experts, E)
        if not named:
            raise ValueError(f"expert_parallel: {layer.path}.experts has no [E, ...] parameters")
        if E % world:
            raise ValueError(
                f"expert_parallel: {layer.path} has E={E} experts, not divisible by the "
                f"group's {world} ranks"
            )
        form = _verify_form(experts, [p for _, p in named], E)
        n_local = E // world
        info = EPInfo(group, rank, world, E, rank * n_local, n_local)
        done.append((layer, experts, named, form, info))
    for layer, experts, named, form, info in done:
        for _, p in named:
            p.data = p.data[info.first_expert : info.first_expert + info.num_local].clone()
        key = len(_EP_LAYERS)
        _EP_LAYERS.append(EPLayer(layer.path, info, form, experts, dispatch))
        experts._capmoe_ep = info
        experts._capmoe_ep_key = key
        experts._capmoe_ep_params = tuple(n for n, _ in named)
        experts._capmoe_ep_form = form.to_str()  # a constant for Dynamo (no json in the trace)
        experts.forward = types.MethodType(_ep_experts_forward, experts)
    return model


def _ep_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    params = [getattr(self, n) for n in self._capmoe_ep_params]
    return ep_experts_op(
        hidden_states, top_k_index, top_k_weights, params, self._capmoe_ep_form, self._capmoe_ep_key
    )


# ---------------------------------------------------------------------------------------------
# timings (benchmarks)


@dataclasses.dataclass
class CallTiming:
    name: str
    compute_s: float = 0.0  # local expert GEMMs
    comm_s: float = 0.0  # inside collectives (waiting for the slowest rank included)
    route_s: float = 0.0  # capacity policy on the group's routing metadata
    total_s: float = 0.0
    recv_rows: int = 0  # (token, expert) rows this rank's experts computed


_timings: list[list[CallTiming]] = []


@contextlib.contextmanager
def record_timings() -> Iterator[list[CallTiming]]:
    """Collect one :class:`CallTiming` per EP layer call made inside the block."""
    out: list[CallTiming] = []
    _timings.append(out)
    try:
        yield out
    finally:
        _timings.remove(out)


class _Clock:
    def __init__(self, name: str):
        self.t = CallTiming(name)
        self.on = bool(_timings)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def part(self, field: str):
        if not self.on:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.t, field, getattr(self.t, field) + time.perf_counter() - t0)

    def done(self):
        if self.on:
            self.t.total_s = time.perf_counter() - self.start
            for sink in _timings:
                sink.append(self.t)


# ---------------------------------------------------------------------------------------------
# collectives


def _check_agreement(info: EPInfo, header: torch.Tensor, what: str) -> torch.Tensor:
    """All-gather each rank's int64 header ``[T_r, fingerprint, ...]``; the fingerprints must
    agree, else every rank raises the same RuntimeError."""
    out = [torch.empty_like(header) for _ in range(info.world)]
    dist.all_gather(out, header, group=info.group)
    got = torch.stack(out)
    fps = got[:, 1].tolist()
    if len(set(fps)) != 1:
        raise RuntimeError(
            f"capmoe EP: ranks disagree on the configuration of {what} (fingerprints by rank: "
            f"{fps}); every rank must compile the same model with the same capmoe options"
        )
    return got


def _fingerprint(obj: Any) -> int:
    s = json.dumps(obj, sort_keys=True, default=str)
    return zlib.crc32(s.encode()) & 0x7FFFFFFF


def _all_gather_rows(info: EPInfo, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenation over ranks of ``t`` [T_r, ...] (uneven T_r: padded to the max)."""
    m = max(counts)
    pad = t.new_zeros((m, *t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(info.world)]
    dist.all_gather(out, pad, group=info.group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


def _dispatch_compute_combine(
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    params: list[torch.Tensor],
    form: ExpertForm,
    info: EPInfo,
    clock: _Clock,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) with experts spread over the group:
    counts exchange, all-to-all of (token, expert) rows to the experts' owners, local grouped
    GEMMs, all-to-all back, weighted combine here. Sentinel ids (>= E) are never sent."""
    T, H = x.shape
    E, W = info.num_experts, info.world
    flat = ids.reshape(-1).long()
    fw = w.reshape(-1)
    tok = torch.arange(flat.numel(), device=x.device) // max(ids.shape[1], 1)
    real = flat < E
    flat, fw, tok = flat[real], fw[real], tok[real]
    order = torch.argsort(flat, stable=True)  # by owner rank, then expert
    flat, fw, tok = flat[order], fw[order], tok[order]
    dest = info.owner(flat)
    send_counts = torch.bincount(dest, minlength=W)
    recv_counts = torch.empty_like(send_counts)
    with clock.part("comm_s"):
        dist.all_to_all_single(recv_counts, send_counts, group=info.group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    n_recv = sum(recv_splits)
    send_x = x[tok]
    send_e = flat - dest * info.num_local
    recv_x = x.new_empty(n_recv, H)
    recv_e = flat.new_empty(n_recv)
    with clock.part("comm_s"):
        dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=info.group)
        dist.all_to_all_single(recv_e, send_e, recv_splits, send_splits, group=info.group)
    with clock.part("compute_s"):
        if n_recv:
            ones = torch.ones(n_recv, 1, dtype=x.dtype, device=x.device)
            if grouped.supports(form, x.dtype):
                y = grouped.moe_experts_grouped(recv_x, recv_e[:, None], ones, params, form)
            else:
                y = moe_experts_reference(recv_x, recv_e[:, None], ones, params, form)
        else:
            y = recv_x
    clock.t.recv_rows += n_recv
    back = x.new_empty(flat.numel(), H)
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
    form: str,
    key: int,
) -> torch.Tensor:
    """The sharded experts of EP layer ``key`` on the model's own selection (no capacity)."""
    layer = _EP_LAYERS[key]
    clock = _Clock(layer.name)
    header = torch.tensor([x.shape[0], _fingerprint([layer.name, form, "eager"])])
    with clock.part("comm_s"):
        _check_agreement(layer.info, header, f"layer {layer.name}")
    out = _dispatch_compute_combine(
        x, ids, weights, params, ExpertForm.from_str(form), layer.info, clock
    )
    clock.done()
    return out


@ep_experts_op.register_fake
def _ep_experts_fake(x, ids, weights, params, form, key):
    return torch.empty_like(x)


def route_group(
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    rank_of_row: torch.Tensor,
    info: EPInfo,
    opts: dict,
    row_counts: list[int],
    seq_counts: list[int],
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC's capacity policy on the group's tokens (the concatenation of every rank's rows).

    Deterministic and computed identically on every rank. ``expanded_drop`` uses, for each
    row, the experts of the rank that holds it (a token's extra experts cost no
    communication). ``capacity_scope="sequence"`` routes each sequence on its own (equal to
    routing the concatenation, and needs no equal sequence lengths across ranks).
    """
    T, E = probs.shape
    n_valid = T if valid is None else int(valid.sum())
    gamma = opts["capacity_factor"]
    if gamma is None or T == 0 or n_valid < opts["min_tokens"]:
        return _pad(ids, weights, opts, info, E)
    if opts["policy"] != "expanded_drop" and opts["capacity_scope"] == "batch":
        return route_with_options(
            probs, ids, weights, opts, local_experts=None, min_tokens=0, valid=valid
        )
    outs_i, outs_w = [], []
    blocks = (
        [(0, T, 1)]
        if opts["capacity_scope"] == "batch"
        else [
            (s, c, n) for s, c, n in zip(_starts(row_counts), row_counts, seq_counts, strict=True)
        ]
    )
    for s0, n, nseq in blocks:
        sl = slice(s0, s0 + n)
        v = None if valid is None else valid[sl]
        if n == 0:
            oi, ow = _pad(ids[sl], weights[sl], opts, info, E)
        elif opts["policy"] == "expanded_drop":
            oi, ow = _expanded_drop_ep(
                probs[sl], ids[sl], weights[sl], rank_of_row[sl], info, opts, v, nseq
            )
        else:
            oi, ow = route_with_options(
                probs[sl],
                ids[sl],
                weights[sl],
                opts,
                local_experts=None,
                min_tokens=0,
                capacity_scope="sequence",
                num_sequences=max(nseq, 1),
                valid=v,
            )
        outs_i.append(oi)
        outs_w.append(ow)
    return torch.cat(outs_i), torch.cat(outs_w)


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def _pad(ids, weights, opts, info, E):
    """The selection unchanged, in the width ``route_group`` returns for these options."""
    ids = ids.long()
    if opts["capacity_factor"] is None or opts["policy"] != "expanded_drop":
        return ids.clone(), weights.clone()
    T = ids.shape[0]
    return (
        torch.cat([ids, ids.new_full((T, info.num_local), E)], 1),
        torch.cat([weights, weights.new_zeros(T, info.num_local)], 1),
    )


def _expanded_drop_ep(P, ids, W, rank_of_row, info, opts, valid, nseq):
    """SPEC's expanded_drop with per-row local experts L(t) = the experts of t's rank.

    Candidates K = S u {(t, e): e in L(t)}; every expert keeps its C candidates of largest P
    (ties: smaller t). That is the ``score`` rule applied to the extended selection K, so
    this calls ``route_reference(policy="score")`` on K with C forced through
    ``min_capacity`` (K has more than k columns, which would change C's formula)."""
    T, E = P.shape
    k = ids.shape[1]
    ids = ids.long()
    G = nseq if opts["capacity_scope"] == "sequence" else 1
    local = rank_of_row[:, None] * info.num_local + torch.arange(info.num_local)  # [T, El]
    dup = (local[:, :, None] == ids[:, None, :]).any(-1)
    scale = _token_scale(P, ids, W)
    add_w = (P.float().gather(1, local) * scale[:, None]).to(W.dtype)
    ext_ids = torch.cat([ids, local], 1)
    ext_w = torch.cat([W, add_w], 1)
    R = T // G
    if valid is None:
        C = capacity(R, E, k, opts["capacity_factor"], opts["min_capacity"], opts["capacity_align"])
        caps = [int(C)] * G
    else:
        per = valid.view(G, R).sum(1)
        caps = capacity(
            per, E, k, opts["capacity_factor"], opts["min_capacity"], opts["capacity_align"]
        ).tolist()
    oi_parts, ow_parts = [], []
    for g in range(G):
        sl = slice(g * R, (g + 1) * R)
        oi, ow = route_reference(
            P[sl],
            ext_ids[sl],
            ext_w[sl],
            capacity_factor=1e-9,  # C = min_capacity = the C of the real selection
            policy="score",
            min_tokens=0,
            min_capacity=int(caps[g]),
            valid=None if valid is None else valid[sl],
        )
        oi_parts.append(oi)
        ow_parts.append(ow)
    oi, ow = torch.cat(oi_parts), torch.cat(ow_parts)
    extra_i, extra_w = oi[:, k:], ow[:, k:]
    extra_i = torch.where(dup, torch.full_like(extra_i, E), extra_i)
    extra_w = torch.where(dup, torch.zeros_like(extra_w), extra_w)
    oi = torch.cat([oi[:, :k], extra_i], 1)
    ow = torch.cat([ow[:, :k], extra_w], 1)
    if opts["renormalize"]:
        before = W.float().sum(-1, keepdim=True)
        after = ow.float().sum(-1, keepdim=True)
        factor = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 1.0)
        ow = (ow.float() * factor).to(ow.dtype)
    return oi, ow


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
    params: list[torch.Tensor],
    form: str,
) -> torch.Tensor:
    """A rewritten EP layer: capacity over the group's tokens, then dispatch/compute/combine.

    ``layer`` indexes ``ops._LAYERS`` (options, resolved now), ``key`` the EP registry."""
    from .. import ops, telemetry

    h = ops._LAYERS[layer]
    ep = _EP_LAYERS[key]
    info = ep.info
    opts = h.options()
    clock = _Clock(h.name)
    T = x.shape[0]
    valid = None
    if opts["exclude_padding"] and opts["capacity_factor"]:
        valid = ops.padding_rows(attention_mask, T, num_sequences)
    if opts["capacity_scope"] == "sequence" and num_sequences < 1:
        raise RuntimeError(
            f"capmoe: capacity_scope='sequence' needs the [B, S] structure of layer {h.name}'s "
            "rows, which the graph does not show (see capmoe_compile.explain)"
        )
    fp_opts = {k: v for k, v in opts.items() if k != "local_experts"}
    fp = _fingerprint([ep.name, form, fp_opts, valid is not None])
    header = torch.tensor([T, fp, max(num_sequences, 1), int(telemetry.is_recording())])
    with clock.part("comm_s"):
        got = _check_agreement(info, header, f"layer {h.name}")
    counts = got[:, 0].tolist()
    seqs = got[:, 2].tolist()
    off = sum(counts[: info.rank])
    # The group's routing metadata is gathered when capacity is on, or when any rank records
    # telemetry (loads of the whole group); every rank decides alike from the header.
    if opts["capacity_factor"] is None and not any(got[:, 3].tolist()):
        out_ids, out_w = ids.long(), weights
    else:
        k = ids.shape[1]
        E = probs.shape[1]
        cols = [probs.double(), ids.double(), weights.double()]
        if valid is not None:
            cols.append(valid.double()[:, None])
        packed = torch.cat(cols, 1)
        with clock.part("comm_s"):
            g = _all_gather_rows(info, packed, counts)
        gP = g[:, :E].to(probs.dtype)
        g_ids = g[:, E : E + k].long()
        gW = g[:, E + k : E + 2 * k].to(weights.dtype)
        g_valid = None if valid is None else g[:, E + 2 * k] > 0.5
        rank_of_row = torch.repeat_interleave(torch.arange(info.world), torch.tensor(counts))
        with clock.part("route_s"):
            g_out_i, g_out_w = route_group(
                gP, g_ids, gW, rank_of_row, info, opts, counts, seqs, g_valid
            )
        if opts["capacity_factor"] is None:
            g_out_i, g_out_w = g_ids, gW
        out_ids, out_w = g_out_i[off : off + T], g_out_w[off : off + T]
        g_out = g_out_i
        if telemetry.is_recording():
            nseq = sum(seqs) if opts["capacity_scope"] == "sequence" else 1
            if (
                opts["capacity_scope"] == "sequence"
                and len(set(c // max(s, 1) for c, s in zip(counts, seqs, strict=True))) > 1
            ):
                nseq = 1  # unequal sequence lengths across ranks: report as one group
            telemetry.record(h.name, g_ids, g_out, info.num_experts, opts, g_valid, nseq)
    out = _dispatch_compute_combine(
        x, out_ids, out_w, params, ExpertForm.from_str(form), info, clock
    )
    clock.done()
    return out


@ep_moe_op.register_fake
def _ep_moe_fake(x, probs, ids, weights, layer, key, num_sequences, mask, params, form):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# hooks for the passes (capmoe_compile/passes/moe_layers.py)


def compiled_as(epn) -> str:
    """What :func:`rewrite_layer` chose for the layer of ``epn``: "static" or "opaque: <why>"."""
    return _EP_LAYERS[epn.args[5]].compiled_as


def rewrite_layer(graph, epn, probs, ids, weights, layer: int, num_seq, mask):
    """Insert the EP layer into ``graph`` in place of its expert region; returns the new output
    node. Static functional collectives where they apply (``functional.py``), else the opaque
    ``capmoe::ep_moe`` op. Called by the passes while compiling: a collective (every rank
    compiles the same graph at the same call)."""
    from .. import ops
    from . import functional

    x, _, _, params, form_str, key = epn.args
    ep = _EP_LAYERS[key]
    opts = ops._LAYERS[layer].options()
    xv = x.meta.get("example_value")
    iv = ids.meta.get("example_value") if hasattr(ids, "meta") else None
    why = "dispatch='opaque'" if ep.dispatch == "opaque" else ""
    if not why:
        mask_used = mask is not None and opts["exclude_padding"]
        if xv is None or iv is None:
            why = "no example shapes"
        else:
            why = functional.why_not_static(opts, mask_used, xv.dtype, ep.form)
    plan = None
    if not why:
        got = functional.make_plan(layer, key, int(xv.shape[0]), int(iv.shape[1]), opts, form_str)
        if isinstance(got, str):
            why = got
        else:
            plan = len(functional._PLANS) - 1
    if plan is not None:
        ep.compiled_as = "static"
        return graph.call_function(
            functional.ep_moe_static, (x, probs, ids, weights, list(params), plan)
        )
    ep.compiled_as = f"opaque: {why}"
    args = (x, probs, ids, weights, layer, key, num_seq, mask, list(params), form_str)
    return graph.call_function(ep_moe_op._opoverload, args)


def ep_node(expert_nodes) -> torch.fx.Node | None:
    """The ``capmoe::ep_experts`` node of a layer's expert region, if the layer is EP."""
    for n in expert_nodes:
        if n.op == "call_function" and n.target is torch.ops.capmoe.ep_experts.default:
            return n
    return None
