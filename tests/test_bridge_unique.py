"""The loop bridge's unique-values shape (``capmoe_compile/bridge_unique.py``): an experts
forward looping ``for v in ids.unique(): if v < N: ... out[ids == v] = ...`` (transformers'
Ergo with ``experts_implementation="eager"``) becomes a loop over every expert index, equal
to the original on any selection the original runs on (sentinels past the experts, negative
ids that index from the end, unhit experts), one graph under capmoe, and matched by the
passes; loops it cannot prove the same are left as written, with the reason."""

from __future__ import annotations

import moe_styles
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from capmoe_compile import bridge


class _Cfg:
    _experts_implementation = "eager"


@use_experts_implementation(has_gate=False, is_transposed=True)
class _UniqueLoopExperts(nn.Module):
    """One route per row, unit weights: each row's expert writes its row (Ergo's shape)."""

    def __init__(self, config, E=6, H=8, F=12):
        super().__init__()
        self.num_experts = E
        self.up_proj = nn.Parameter(torch.randn(E, H, F) * H**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, F, H) * F**-0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        top_k_index = top_k_index.squeeze(-1)
        final_hidden_states = torch.zeros_like(hidden_states)
        for expert_idx in top_k_index.unique():
            if expert_idx < self.num_experts:
                expert_mask = top_k_index == expert_idx
                current_state = hidden_states[expert_mask]
                current = F.relu(current_state @ self.up_proj[expert_idx]).square()
                final_hidden_states[expert_mask] = current @ self.down_proj[expert_idx]
        return final_hidden_states


def _original():
    return _UniqueLoopExperts.forward.__wrapped__


def test_bridged_equals_the_original_on_any_selection_it_runs_on():
    torch.manual_seed(0)
    m = _UniqueLoopExperts(_Cfg())
    fn = bridge.bridged_forward(_original())
    assert fn is not _original(), bridge.why_not_bridged(_original())
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        T = 3 + 7 * seed
        x = torch.randn(T, 8, generator=gen)
        ids = torch.randint(-6, 8, (T, 1), generator=gen)  # < 0: from the end; >= 6: skipped
        ones = torch.ones(T, 1)
        assert torch.equal(fn(m, x, ids, ones), _original()(m, x, ids, ones)), seed
    x = torch.randn(4, 8)
    ids = torch.tensor([[1], [1], [7], [1]])  # experts 0, 2-5 unhit
    assert torch.equal(fn(m, x, ids, torch.ones(4, 1)), _original()(m, x, ids, torch.ones(4, 1)))


class _Block(moe_styles._Style):
    """Softmax top-2, rows repeated per route, the unique-values experts, weighted sum."""

    def __init__(self, E=6, H=8, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = _UniqueLoopExperts(_Cfg(), E=E, H=H)

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(-1, H)
        p = torch.softmax(self.gate(h), dim=-1)
        w, ids = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids, w = self._route(p, ids, w)
        rows = h.repeat_interleave(self.k, dim=0)
        flat = ids.reshape(-1, 1)
        y = self.experts(rows, flat, rows.new_ones(flat.shape))
        return (y.view(-1, self.k, H) * w.unsqueeze(-1)).sum(1).reshape(B, S, H)


def test_the_block_is_one_graph_matched_and_equals_eager_and_the_oracle():
    torch.manual_seed(1)
    m = _Block().eval()
    x = torch.randn(2, 12, 8)
    rep, off, got = moe_styles.compile_off_on(m, x)
    with torch.no_grad():
        torch.testing.assert_close(off, m(x), rtol=1e-4, atol=1e-5)
    assert [r.matched for r in rep.layers] == [True], rep
    want, dropped = moe_styles.oracle(m, x, 0.5, "score")
    assert dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _adds_into_rows(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique():
        if e < self.num_experts:
            mask = top_k_index == e
            out[mask] += hidden_states[mask] @ self.up_proj[e]
    return out


def _uses_the_value(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique():
        if e < self.num_experts:
            mask = top_k_index == e
            out[mask] = hidden_states[mask] @ self.up_proj[e] * e
    return out


def _leaks(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique():
        if e < self.num_experts:
            mask = top_k_index == e
            y = hidden_states[mask] @ self.up_proj[e]
            out[mask] = y
    return out + y.sum()


def _no_weight_indexed(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique():  # nothing bounds e: -10**6 would run as well
        if e < self.num_experts:
            mask = top_k_index == e
            out[mask] = hidden_states[mask] * 2.0
    return out


def _local_alias_of_weights(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    w = self.up_proj
    for e in top_k_index.unique():
        if e < self.num_experts:
            mask = top_k_index == e
            out[mask] = hidden_states[mask] @ w[e]
    return out


def _no_guard(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique():
        mask = top_k_index == e
        out[mask] = hidden_states[mask] @ self.up_proj[e]
    return out


def test_loops_it_cannot_prove_the_same_are_left_as_written():
    for fn, why in (
        (_adds_into_rows, "other than name bindings"),
        (_uses_the_value, "used other than"),
        (_leaks, "read after it"),
        (_no_weight_indexed, "indexes no self."),
        (_local_alias_of_weights, "used other than"),
        (_no_guard, "not one `if e < <bound>:`"),
    ):
        assert bridge.bridged_forward(fn) is fn, fn.__name__
        assert why in bridge.why_not_bridged(fn), (fn.__name__, bridge.why_not_bridged(fn))
