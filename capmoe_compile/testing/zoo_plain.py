"""Plain-PyTorch MoE layers written the common ways people write them by hand (a
``ModuleList`` loop, stacked weights with ``bmm``, a Switch-style top-1 layer):
:func:`plain_moe`, re-exported by :mod:`capmoe_compile.testing.zoo`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExpert(nn.Module):
    """One expert MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(nn.Module):
    """Mixtral-style layer: softmax -> top-k -> renormalise, a Python loop over a ModuleList."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, ffn) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x = x.view(-1, hidden)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)

        out = torch.zeros_like(x)
        # [E, k, T]: which (slot, token) pairs go to each expert
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[expert_idx])
            current = expert(x[token]) * routing_weights[token, slot, None]
            out.index_add_(0, token, current.to(x.dtype))
        return out.view(batch, seq, hidden)


class StackedBmmMoE(nn.Module):
    """Stacked expert weights ``[E, H, F]``; every expert runs on every token with ``bmm`` and a
    dense ``[T, E]`` combine matrix (zeros off the top-k) mixes the results with ``einsum``."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        for w in (self.w_gate, self.w_up):
            nn.init.normal_(w, std=hidden**-0.5)
        nn.init.normal_(self.w_down, std=ffn**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x = x.reshape(-1, hidden)
        probs = self.gate(x).softmax(dim=-1)
        topk_probs, topk_idx = probs.topk(self.top_k, dim=-1)
        topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, topk_idx, topk_probs)  # [T, E]

        xe = x.unsqueeze(0).expand(self.num_experts, -1, -1)  # [E, T, H]
        h = F.silu(torch.bmm(xe, self.w_gate)) * torch.bmm(xe, self.w_up)  # [E, T, F]
        y = torch.bmm(h, self.w_down)  # [E, T, H]
        out = torch.einsum("te,eth->th", combine, y)
        return out.reshape(batch, seq, hidden)


class SwitchExpert(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwitchTop1MoE(nn.Module):
    """Switch-Transformer layer: top-1 by ``max`` over the softmax, the top-1 probability as the
    gate weight, GELU MLP experts with biases, boolean-mask dispatch per expert."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int = 1):
        super().__init__()
        if top_k != 1:
            raise ValueError("switch_top1 is top-1")
        self.num_experts = num_experts
        self.top_k = 1
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwitchExpert(hidden, ffn) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_probs = torch.softmax(self.router(x), dim=-1)  # [B, S, E]
        gate, expert_index = router_probs.max(dim=-1)  # [B, S]
        out = torch.zeros_like(x)
        for idx, expert in enumerate(self.experts):
            token_mask = expert_index == idx
            out[token_mask] = expert(x[token_mask]).to(out.dtype)
        return out * gate.unsqueeze(-1)


_PLAIN: dict[str, type[nn.Module]] = {
    "modulelist_loop": ModuleListMoE,
    "stacked_bmm": StackedBmmMoE,
    "switch_top1": SwitchTop1MoE,
}


PLAIN_KINDS: tuple[str, ...] = tuple(_PLAIN)


def plain_moe(
    kind: str,
    hidden: int = 64,
    ffn: int = 128,
    num_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A plain-PyTorch MoE layer (``x [B, S, H] -> [B, S, H]``) of ``kind`` in ``PLAIN_KINDS``,
    with random weights from ``seed``, in eval mode. ``switch_top1`` ignores ``top_k``."""
    if kind not in _PLAIN:
        raise ValueError(f"unknown plain MoE kind {kind!r}; known: {', '.join(PLAIN_KINDS)}")
    if kind == "switch_top1":
        top_k = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _PLAIN[kind](hidden, ffn, num_experts, top_k)
    return module.eval()
