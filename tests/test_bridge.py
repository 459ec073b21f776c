"""The graph-break bridges of capmoe's compiles (``capmoe_compile/bridge.py``)."""

from __future__ import annotations

import torch
import torch._dynamo.config as dynamo_config
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from transformers.integrations.moe import use_experts_implementation

from capmoe_compile import bridge


def _flags() -> tuple[bool, bool]:
    return dynamo_config.capture_scalar_outputs, dynamo_config.capture_dynamic_output_shape_ops


def test_flags_only_for_capmoe_compiles():
    """backend="capmoe" traces with both capture flags; "eager" and "inductor" compiles in the
    same process trace without them, and nothing stays set afterwards."""
    seen: list[tuple[bool, bool]] = []

    def f(x):
        seen.append(_flags())  # read at trace time
        return x + 1

    before = _flags()
    x = torch.randn(4)
    torch.compile(f, backend="capmoe")(x)
    torch.compile(f, backend="capmoe", options={"capacity_factor": 1.0})(x)
    torch.compile(f, backend="eager")(x)
    torch.compile(f, backend="inductor")(x)
    assert seen == [(True, True), (True, True), before, before]
    assert _flags() == before


def test_where_loop_no_rewrite_takes_traces_as_without_bridges():
    """A loop over experts with ``torch.where`` (data-dependent shapes) is one graph with the
    capture flags; when no pass rewrites it (this backend has none), the frame is traced again
    without them, as plain backends trace it (issue 23): the graphs that run are the plain
    ones, and both compute what eager computes."""

    def f(x, ids):
        out = torch.zeros_like(x)
        for e in range(4):
            (rows,) = torch.where(ids == e)
            out.index_add_(0, rows, x[rows] * (e + 1))
        return out

    x, ids = torch.randn(16, 8), torch.randint(0, 4, (16,))
    plain, trials = CompileCounter(), []

    def bridged(gm, example_inputs):
        trials.append(bridge._trial and bool(bridge.data_dependent_nodes(gm)))
        return gm.forward

    bridged.backend_ctx_ctor = bridge.capture_context
    want = f(x, ids)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend=plain)(x, ids), want)
    torch._dynamo.reset()
    bridge.RETRACED.pop(f.__code__, None)
    assert torch.equal(torch.compile(f, backend=bridged)(x, ids), want)
    torch._dynamo.reset()
    assert trials[0], "the trial with the flags captures the loop whole"
    assert "where" in bridge.RETRACED[f.__code__]
    assert len(trials) - 1 == plain.frame_count  # then the plain graphs


# --- the eager-experts loop over hit experts --------------------------------------------------


class _Experts(torch.nn.Module):
    """The shape of transformers' eager experts loop (this project's own code)."""

    def __init__(self, E=4, H=8, F=16):
        super().__init__()
        self.num_experts = E
        self.up = torch.nn.Parameter(torch.randn(E, F, H) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(E, H, F) * 0.3)

    def forward(self, x, ids, w):
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(ids, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = e[0]
            if e == self.num_experts:
                continue
            slot, tok = torch.where(mask[e])
            h = torch.relu(x[tok] @ self.up[e].t()) @ self.down[e].t()
            out.index_add_(0, tok, h * w[tok, slot, None])
        return out


def _unsafe_item(self, x, ids):
    out = torch.zeros_like(x)
    hit = (ids.bincount(minlength=4) > 0).nonzero()
    for e in hit:
        e = e[0]
        n = (ids == e).sum().item()  # would read a value for an expert with no rows
        out.index_add_(0, (ids == e).nonzero()[:, 0], x[ids == e] * n)
    return out


def _unsafe_setitem(self, x, ids):
    out = torch.zeros_like(x)
    hit = (ids.bincount(minlength=4) > 0).nonzero()
    for e in hit:
        e = e[0]
        out[ids == e] = x[ids == e] * 2
    return out


def _unsafe_leak(self, x, ids):
    out = torch.zeros_like(x)
    hit = (ids.bincount(minlength=4) > 0).nonzero()
    for e in hit:
        e = e[0]
        rows = (ids == e).nonzero()[:, 0]
        out.index_add_(0, rows, x[rows])
    return out + rows.sum()  # the last expert's rows: the last *hit* expert's in eager


def _no_sentinel_skip(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, num_classes=self.num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    up, down = self.up, self.down
    for e in hit:
        e = e[0]  # index E (the sentinel column) would reach up[E] when every index runs
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, (x[tok] @ up[e].t()) @ down[e].t() * w[tok, slot, None])
    return out


def _rows_not_from_mask(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, num_classes=self.num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == self.num_experts:
            continue
        rows = torch.arange(x.shape[0])  # every row, hit or not: an unhit expert would add
        out.index_add_(0, rows, x @ self.up[e].t() @ self.down[e].t())
    return out


def _mask_not_one_hot(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = (torch.nn.functional.one_hot(ids, self.num_experts + 1) - 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()  # negative entries: sums cancel
    for e in hit:
        e = e[0]
        if e == self.num_experts:
            continue
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, x[tok] @ self.up[e].t() @ self.down[e].t())
    return out


def _empty_skip_of_other_rows(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, self.num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
    for e in hit:
        e = e.item()
        slot, tok = torch.where(mask[e])
        if slot.numel() == 0:
            continue
        out.index_add_(0, tok, x[tok] @ self.up[e].t() @ self.down[e].t())
        out.index_add_(0, slot, x[slot])
    return out


def _mask_changed_in_place(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, self.num_experts + 1).permute(2, 1, 0)
    mask.sub_(1)  # negative entries: an expert's row can sum to 0 with entries set
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == self.num_experts:
            continue
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, x[tok] @ self.up[e].t() @ self.down[e].t())
    return out


def _mask_from_caller(self, x, mask):
    out = torch.zeros_like(x)  # the caller's mask may hold any values: not provably one-hot
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == self.num_experts:
            continue
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, x[tok] @ self.up[e].t() @ self.down[e].t())
    return out


def _mask_rebound(self, x, ids, w):
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, self.num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    mask = torch.nn.functional.one_hot(ids.flip(0), self.num_experts + 1).permute(2, 1, 0)
    for e in hit:  # experts hit by the first mask, rows of the second
        e = e[0]
        if e == self.num_experts:
            continue
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, x[tok] @ self.up[e].t() @ self.down[e].t())
    return out


class _NemotronStyle(_Experts):
    """Nemotron-H's eager loop: ``nonzero().squeeze(-1)`` read with ``.item()``, no sentinel
    skip (the weights indexed by the expert bound the loop), an empty-selection skip."""

    def forward(self, x, ids, w):
        out = torch.zeros_like(x, dtype=w.dtype)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(ids, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
        for e in hit:
            e = e.item()
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            h = torch.relu(F.linear(x[tok], self.up[e])) ** 2
            h = F.linear(h, self.down[e]) * w[tok, slot, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out.to(x.dtype)


def test_bridged_forward_equals_the_original():
    torch.manual_seed(0)
    m = _Experts()
    x, ids = torch.randn(10, 8), torch.randint(0, 4, (10, 2))
    ids[0, 0] = 4  # the sentinel index is skipped
    ids[:, :] = ids.clamp(max=2)  # experts 3 (and the sentinel) hit by no token
    w = torch.rand(10, 2)
    fn = bridge.bridged_forward(_Experts.forward)
    assert fn is not _Experts.forward, bridge.why_not_bridged(_Experts.forward)
    assert torch.equal(fn(m, x, ids, w), m(x, ids, w))


def test_nemotron_style_loop_bridged_and_equal():
    """A loop with no sentinel skip runs every index below the expert weights' length (the
    sentinel column past them is never hit by a valid top-k); the empty skip is dropped."""
    torch.manual_seed(0)
    m = _NemotronStyle()
    fn = bridge.bridged_forward(_NemotronStyle.forward)
    assert fn is not _NemotronStyle.forward, bridge.why_not_bridged(_NemotronStyle.forward)
    x, w = torch.randn(10, 8), torch.rand(10, 2)
    ids = torch.randint(0, 4, (10, 2)).clamp(max=2)  # expert 3 hit by no token
    assert torch.equal(fn(m, x, ids, w), m(x, ids, w))
    # no sentinel, no weights indexed (a local alias): left as written
    assert bridge.bridged_forward(_no_sentinel_skip) is _no_sentinel_skip


def test_nemotron_style_loop_one_graph():
    """The Nemotron-style loop traces into one graph under the capmoe bridges, equal to eager."""
    torch.manual_seed(1)
    m = _NemotronStyle()
    cnt = CompileCounter()
    cnt.backend_ctx_ctor = bridge.capture_context
    x, w, ids = torch.randn(12, 8), torch.rand(12, 2), torch.randint(0, 4, (12, 2))

    fn = bridge.bridged_forward(_NemotronStyle.forward)

    def run(x, ids, w):
        return fn(m, x, ids, w)

    torch._dynamo.reset()
    got = torch.compile(run, backend=cnt, fullgraph=True)(x, ids, w)
    torch._dynamo.reset()
    assert cnt.frame_count == 1
    torch.testing.assert_close(got, m(x, ids, w))


def test_unsafe_loops_are_not_bridged():
    for fn, why in (
        (_unsafe_item, ".item()"),
        (_unsafe_setitem, "writes into a tensor"),
        (_unsafe_leak, "read after it"),
        (_no_sentinel_skip, "sentinel"),
        (_rows_not_from_mask, "rows other than torch.where(mask[e])"),
        (_mask_not_one_hot, "not a one_hot"),
        (_empty_skip_of_other_rows, "empty selection"),
        (_mask_changed_in_place, "changed in place"),
        (_mask_from_caller, "not computed in the forward"),
        (_mask_rebound, "rebound after"),
    ):
        assert bridge.bridged_forward(fn) is fn
        assert why in bridge.why_not_bridged(fn)


# --- a transformers-decorated experts module, end to end -------------------------------------


class _Cfg:
    _experts_implementation = "eager"


# At module level, as transformers' experts classes are: the bridge finds decorated classes in
# the loaded modules' namespaces (capmoe_compile/bridge.py, ``_scan``).
@use_experts_implementation
class _DecoratedExperts(torch.nn.Module):
    """Transformers' eager experts loop over hit experts (this project's own code)."""

    def __init__(self, config, E=4, H=8, F=16):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * F, H) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn(E, H, F) * 0.3)
        self.act_fn = torch.nn.functional.silu

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            expert_hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert_idx])
            cur = hidden_states[token_idx]
            gate, up = F.linear(cur, self.gate_up_proj[expert_idx]).chunk(2, -1)
            cur = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            cur = cur * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, cur.to(final.dtype))
        return final


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4, bias=False)
        self.experts = _DecoratedExperts(_Cfg())

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        probs = torch.softmax(self.gate(h), dim=-1)
        w, ids = torch.topk(probs, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return self.experts(h, ids, w).reshape(B, S, H)


def _decorated_block(seed=0):
    torch.manual_seed(seed)
    return _Block().eval()


def test_decorated_eager_experts_rewritten_and_loop_gone():
    """The bridged loop is one graph, the layer is matched, and the rewritten graph no longer
    holds the loop (no where / index_add_ left); capacity off equals eager."""
    from capmoe_compile.passes import run_passes

    block = _decorated_block()
    x = torch.randn(2, 6, 8)
    graphs, reports = [], []

    def be(gm, example_inputs):
        reports.extend(run_passes(gm, example_inputs, None))
        graphs.append(gm)
        return gm.forward

    be.backend_ctx_ctor = bridge.capture_context
    torch._dynamo.reset()
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend=be)(x)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert [r.matched for r in reports] == [True], [r.reason for r in reports]
    left = [
        n
        for n in graphs[0].graph.nodes
        if str(n.target) in ("index_add_", "nonzero")
        or getattr(n.target, "__name__", "") == "where"
    ]
    assert not left, left
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decorated_eager_experts_inductor():
    """backend="capmoe" end to end (Inductor compiles the rewritten graph): capacity off equals
    eager; capacity on drops pairs and equals SPEC's assignment applied to the block."""
    import capmoe_compile

    block = _decorated_block(1)
    x = torch.randn(2, 6, 8)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="capmoe")
    with torch.no_grad():
        want = block(x)
        got = compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with capmoe_compile.config.patch(capacity_factor=0.5, policy="score"):
            got_on = compiled(x)
        # the oracle: route() on the block's own P, S, W, then the experts on the result
        h = x.reshape(-1, 8)
        probs = torch.softmax(block.gate(h), dim=-1)
        w, ids = torch.topk(probs, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids2, w2 = capmoe_compile.route(probs, ids, w, capacity_factor=0.5, policy="score")
        dropped = int((ids2 == 4).sum())
        ids2 = torch.where(ids2 == 4, torch.zeros_like(ids2), ids2)  # weight 0: no effect
        want_on = block.experts(h, ids2, w2).reshape(2, 6, 8)
    torch._dynamo.reset()
    assert dropped > 0
    torch.testing.assert_close(got_on, want_on, rtol=1e-4, atol=1e-5)


class _PerRouteExperts(_DecoratedExperts):
    """Transformers' Ergo shape: an undecorated subclass forward that repeats each token once
    per route and calls its decorated parent (``super().forward``) with unit weights."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        k = top_k_index.shape[1]
        rows = hidden_states.repeat_interleave(k, dim=0)
        flat = top_k_index.reshape(-1, 1)
        y = super().forward(rows, flat, rows.new_ones(flat.shape))
        return (y.view(*top_k_index.shape, -1) * top_k_weights.unsqueeze(-1)).sum(1)


class _PerRouteBlock(_Block):
    def __init__(self):
        super().__init__()
        self.experts = _PerRouteExperts(_Cfg())


def test_undecorated_subclass_calling_its_decorated_parent_runs():
    """The eager implementation under capmoe runs the parent's decorated loop, not the
    subclass's forward again (that recursed until Dynamo's RecursionError on transformers'
    Ergo with ``experts_implementation="eager"``); capacity off equals eager."""
    torch.manual_seed(0)
    block = _PerRouteBlock().eval()
    x = torch.randn(2, 6, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend="capmoe")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert bridge._decorated_forward(_PerRouteExperts) is _DecoratedExperts.forward.__wrapped__
