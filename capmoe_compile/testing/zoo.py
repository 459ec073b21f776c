"""Tiny offline MoE models for tests, the demo and benchmarks.

Two kinds of model live here:

- :func:`build` makes a tiny ``transformers`` causal LM of one MoE family from a config (random
  weights, nothing downloaded), in eval mode, with the requested experts implementation.
- :func:`plain_moe` makes a plain-PyTorch MoE layer written one of the common ways people write
  them by hand (a ``ModuleList`` loop, stacked weights with ``bmm``, a Switch-style top-1 layer).

Random routers are nearly balanced; trained ones are not (the straggler effect the paper is about).
:func:`skew_router_` makes a model's routing skewed the way trained routers are, and
:func:`expert_loads` measures the per-layer expert loads in eager mode, so the skew can be reported.

``transformers`` is imported lazily: :func:`plain_moe` works without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CORE_FAMILIES",
    "EXTRA_FAMILIES",
    "FAMILIES",
    "MAIN_FAMILIES",
    "MoELayer",
    "PLAIN_KINDS",
    "build",
    "clear_build_cache",
    "expert_loads",
    "load_ratio",
    "moe_layers",
    "plain_moe",
    "random_hidden",
    "random_input_ids",
    "skew_router_",
]


# --------------------------------------------------------------------------------------------
# transformers families
# --------------------------------------------------------------------------------------------


def _heads(hidden: int) -> dict:
    heads = 4 if hidden % 4 == 0 else 1
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
    }


def _common(hidden, ffn, layers, vocab) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **_heads(hidden),
    }


def _mixtral(h, f, e, k, n, v):
    return {**_common(h, f, n, v), "num_local_experts": e, "num_experts_per_tok": k}


def _qwen2_moe(h, f, e, k, n, v):
    # Qwen1.5-MoE style: softmax -> top-k without renormalisation, plus a gated shared expert.
    return {
        **_common(h, f, n, v),
        "num_experts": e,
        "num_experts_per_tok": k,
        "moe_intermediate_size": f,
        "shared_expert_intermediate_size": f,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _olmoe(h, f, e, k, n, v):
    return {
        **_common(h, f, n, v),
        "num_experts": e,
        "num_experts_per_tok": k,
        "norm_topk_prob": False,
    }


def _qwen3_moe(h, f, e, k, n, v):
    return {
        **_common(h, f, n, v),
        "num_experts": e,
        "num_experts_per_tok": k,
        "moe_intermediate_size": f,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _deepseek_v3(h, f, e, k, n, v):
    # Sigmoid scores, e_score_correction_bias, group-limited top-k, routed scaling, a shared
    # expert, all layers MoE. Four groups when E allows it (a group's score is its top-2 sum).
    n_group = 4 if e % 4 == 0 and e // 4 >= 2 else 1
    heads = _heads(h)["num_attention_heads"]
    return {
        **_common(h, f, n, v),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_routed_experts": e,
        "num_experts_per_tok": k,
        "moe_intermediate_size": f,
        "n_shared_experts": 1,
        "n_group": n_group,
        # half the groups, and enough of them to hold k experts
        "topk_group": min(n_group, max(n_group // 2, -(-k // (e // n_group)))),
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 0,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "head_dim": 8,
    }


def _gpt_oss(h, f, e, k, n, v):
    return {
        **_common(h, f, n, v),
        "num_local_experts": e,
        "num_experts_per_tok": k,
        "sliding_window": 16,
        # gpt-oss's YaRN scaling, with the original context sized so the factor is consistent
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 16,
        },
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
    }


def _granitemoe(h, f, e, k, n, v):
    return {**_common(h, f, n, v), "num_local_experts": e, "num_experts_per_tok": k}


def _phimoe(h, f, e, k, n, v):
    if k != 2:
        raise ValueError("phimoe's sparsemixer router is top-2 only")
    return {**_common(h, f, n, v), "num_local_experts": e, "num_experts_per_tok": k}


_FAMILY_KWARGS: dict[str, Callable[..., dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "qwen3_moe": _qwen3_moe,
    "gpt_oss": _gpt_oss,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
}

_EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _generic_kwargs(family: str) -> Callable[..., dict]:
    """One recipe for the other families: common sizes under every name they go by, MLA sizes
    for DeepSeek-like attention, no dense leading layers, no group limiting, no KV cache."""

    def kwargs(h, f, e, k, n, v):
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(family)
        out = {
            **_common(h, f, n, v),
            "moe_intermediate_size": f,
            "shared_expert_intermediate_size": f,
            "num_experts_per_tok": k,
            "first_k_dense_replace": 0,
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 1,
            "mlp_only_layers": [],
            "decoder_sparse_step": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "use_cache": False,
            "pad_token_id": 0,
        }
        for name in _EXPERT_COUNT_NAMES:
            if hasattr(defaults, name):
                out[name] = e
        return out

    return kwargs


#: Other families that build tiny with :func:`_generic_kwargs` and whose routers
#: :func:`moe_layers` finds (transformers 5.23; some have a dense first layer, so one MoE layer
#: at ``num_layers=2``; the hybrid ones mix in linear attention or Mamba layers).
EXTRA_FAMILIES: tuple[str, ...] = (
    "deepseek_v2",
    "glm4_moe",
    "dots1",
    "ernie4_5_moe",
    "exaone_moe",
    "solar_open",
    "hunyuan_v1_moe",
    "minimax",
    "minimax_m2",
    "flex_olmo",
    "granitemoeshared",
    "granitemoe_swa",
    "cohere2_moe",
    "qwen3_next",
    "jamba",
    "bailing_hybrid",
)
for _family in EXTRA_FAMILIES:
    _FAMILY_KWARGS[_family] = _generic_kwargs(_family)

#: Families :func:`build` knows, in the order tests and benchmarks walk them.
FAMILIES: tuple[str, ...] = tuple(_FAMILY_KWARGS)
#: The families the project is measured on first.
MAIN_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3")
#: Families with a hand-written recipe (the four main ones and the next four).
CORE_FAMILIES: tuple[str, ...] = FAMILIES[: len(FAMILIES) - len(EXTRA_FAMILIES)]


def build(
    family: str,
    *,
    experts_implementation: str = "grouped_mm",
    num_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    num_experts: int = 8,
    top_k: int = 2,
    vocab: int = 256,
    seed: int = 0,
    skew: float | None = 1.5,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A tiny ``transformers`` causal LM of ``family`` with random weights, in eval mode.

    The same arguments give bit-identical weights (the global RNG is left as it was).
    ``skew`` is the strength given to :func:`skew_router_` (``None`` or 0: balanced routing).
    ``experts_implementation`` is ``"grouped_mm"``, ``"batched_mm"`` or ``"eager"``.

    Every call returns a new model. Small models are built once per process and deep-copied
    afterwards (the skew calibration runs a 1024-token forward); :func:`clear_build_cache`
    forgets them, so that a test of the build itself builds afresh.
    """
    if family not in _FAMILY_KWARGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    key = (family, experts_implementation, num_layers, hidden, ffn, num_experts, top_k, vocab)
    key += (seed, skew, dtype)
    model = _BUILT.get(key)
    if model is None:
        args = (experts_implementation, num_layers, hidden, ffn, num_experts, top_k, vocab)
        model = _build(family, *args, seed, skew, dtype)
        if sum(p.numel() for p in model.parameters()) > _CACHE_MAX_PARAMS:
            return model
        _BUILT[key] = model
    return copy.deepcopy(model)


#: Pristine models :func:`build` made, by its arguments (never handed out: callers get copies).
_BUILT: dict[tuple, nn.Module] = {}
_CACHE_MAX_PARAMS = 1 << 20


def clear_build_cache() -> None:
    """Forget the models :func:`build` kept: the next call of each builds from scratch."""
    _BUILT.clear()


def _build(
    family,
    experts_implementation,
    num_layers,
    hidden,
    ffn,
    num_experts,
    top_k,
    vocab,
    seed,
    skew,
    dtype,
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = _FAMILY_KWARGS[family](hidden, ffn, num_experts, top_k, num_layers, vocab)
    config = AutoConfig.for_model(family, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, experts_implementation=experts_implementation, dtype=torch.float32
        )
    model.eval()
    if skew:
        skew_router_(model, strength=skew, seed=seed)
    _randomize_correction_bias_(model, seed=seed)
    return model.to(dtype)


@torch.no_grad()
def _randomize_correction_bias_(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """DeepSeek-V3-style routers (sigmoid scores plus ``e_score_correction_bias`` for the
    selection only): a nonzero random bias, ``scale`` times the spread (std over tokens) of the
    sigmoid scores, so the bias-adjusted selection differs from top-k of the scores for many
    tokens without swamping the router. Transformers initialises the bias to zeros."""
    layers = [
        layer
        for layer in moe_layers(model)
        if isinstance(getattr(layer.router, "e_score_correction_bias", None), torch.Tensor)
    ]
    if not layers:
        return
    gen = torch.Generator().manual_seed(seed + 2_000_003)
    sample = random_input_ids(model, batch=16, seq=64, seed=seed)
    for layer, x in zip(layers, _router_inputs(model, layers, sample), strict=True):
        scores = torch.sigmoid(x @ layer.router.weight.float().t())
        spread = scores.std(dim=0).mean()
        bias = layer.router.e_score_correction_bias
        noise = torch.randn(bias.shape, generator=gen)
        bias.copy_((scale * spread * noise).to(bias.dtype))


# --------------------------------------------------------------------------------------------
# plain-PyTorch MoE layers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# finding MoE layers, measuring loads, skewing routers
# --------------------------------------------------------------------------------------------


class MoELayer:
    """One MoE layer found in a model: its path, the block, its router and ``E``, ``k``."""

    def __init__(self, path: str, block: nn.Module, router_name: str, num_experts: int, top_k):
        self.path = path
        self.block = block
        self.router_name = router_name
        self.router = getattr(block, router_name)
        self.num_experts = num_experts
        self.top_k = top_k

    @property
    def router_path(self) -> str:
        return f"{self.path}.{self.router_name}" if self.path else self.router_name

    def __repr__(self) -> str:
        return f"MoELayer({self.router_path!r}, E={self.num_experts}, k={self.top_k})"


def _num_experts(block: nn.Module) -> int | None:
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    if isinstance(experts, nn.Module):
        n = getattr(experts, "num_experts", None)
        if isinstance(n, int):
            return n
    n = getattr(block, "num_experts", None)
    if isinstance(n, int) and isinstance(getattr(block, "top_k", None), int):
        return n
    return None


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model``: modules with an ``experts`` child (or ``num_experts`` and
    ``top_k`` attributes) and a router child whose weight is ``[E, H]`` (shared-expert gates
    are skipped). Works on every model this module builds."""
    found = []
    for path, block in model.named_modules():
        num_experts = _num_experts(block)
        if num_experts is None:
            continue
        for name, child in block.named_children():
            if name == "experts" or "shared" in name:
                continue
            weight = getattr(child, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                if weight.shape[0] == num_experts:
                    top_k = getattr(child, "top_k", None) or getattr(block, "top_k", None)
                    found.append(MoELayer(path, block, name, num_experts, top_k))
                    break
    return found


def _selected_experts(output, num_experts: int, top_k) -> torch.Tensor:
    """The expert ids a router picked, from its forward output: the integer tensor of a
    ``(logits, weights, indices)`` tuple, or top-k of the logits of a plain ``nn.Linear`` gate."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    for out in outputs:
        if isinstance(out, torch.Tensor) and not out.is_floating_point():
            return out
    logits = outputs[0]
    if top_k is None:
        raise ValueError("router returns logits only and no top_k is known")
    return logits.reshape(-1, num_experts).topk(top_k, dim=-1).indices


@torch.no_grad()
def expert_loads(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """Per-layer expert loads of one eager forward: ``{router path: int64 [E] counts}``.

    ``input_ids`` is what the model's forward takes first (token ids for a causal LM, hidden
    states ``[B, S, H]`` for a plain layer). Counts come from forward hooks on the routers, so
    they are the model's own selection (bias-adjusted, group-limited where the model does so).
    """
    loads: dict[str, torch.Tensor] = {}
    handles = []
    for layer in moe_layers(model):

        def hook(module, args, output, layer=layer):
            idx = _selected_experts(output, layer.num_experts, layer.top_k)
            counts = torch.bincount(idx.reshape(-1).long(), minlength=layer.num_experts)
            prev = loads.get(layer.router_path)
            loads[layer.router_path] = counts if prev is None else prev + counts

        handles.append(layer.router.register_forward_hook(hook))
    try:
        model(input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return loads


def load_ratio(counts: torch.Tensor) -> float:
    """``max_load / mean_load`` of one layer's counts."""
    counts = counts.float()
    return (counts.max() / counts.mean()).item()


def random_input_ids(model: nn.Module, batch: int = 4, seq: int = 64, seed: int = 0):
    """Random token ids for a causal LM of this zoo."""
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def random_hidden(
    module: nn.Module, batch: int = 4, seq: int = 64, seed: int = 0, dtype=None
) -> torch.Tensor:
    """Random hidden states ``[B, S, H]`` for a plain MoE layer. After :func:`skew_router_` they
    carry the layer's shared direction, as the hidden states of a trained model do."""
    layers = moe_layers(module)
    hidden = layers[0].router.weight.shape[1]
    dtype = dtype or layers[0].router.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, hidden, generator=gen)
    direction = getattr(module, "zoo_shared_direction", None)
    if direction is not None:
        x = x + direction
    return x.to(dtype)


def _router_inputs(model: nn.Module, layers, sample) -> list[torch.Tensor]:
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def pre_hook(module, args, i=i):
            captured[i] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        handles.append(layer.router.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(layers))]


@torch.no_grad()
def skew_router_(model: nn.Module, strength: float = 1.5, seed: int = 0) -> nn.Module:
    """Make routing skewed the way trained routers are; in place; returns ``model``.

    Random hidden states have no common direction, so noise on router weights gives no
    consistent skew. As in trained models, give the router inputs a shared direction ``d``
    (added to every row of the input embedding table of a causal LM; for a plain layer,
    :func:`random_hidden` adds it) and add a multiple of ``d`` to every router's weight rows,
    calibrated on one forward of random tokens so that expert ``e``'s mean logit becomes
    ``linspace(s, -s, E)[e]`` times the spread (std over tokens) of the router logits.
    ``strength`` is ``s``. Measured at s = 1.5, E=8, k=2 on 2048 random tokens: max/mean load
    2.4-3.5 per layer (about 2.9 typical; 1.2-1.8 unskewed; the ceiling is E/k = 4), the
    value of a Gaussian router with these offsets (2.86). Calling it again keeps ``d``.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("no MoE layer found")
    hidden = layers[0].router.weight.shape[1]
    shared = getattr(model, "zoo_shared_direction", None)
    if shared is None:
        d = torch.randn(hidden, generator=torch.Generator().manual_seed(seed + 1_000_003))
    else:  # skewed before: keep the direction the hidden states already carry
        d = shared.float()
    d = d / d.norm()

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embed, nn.Embedding):
        # shift every token's embedding along d by the embeddings' typical norm
        weight = embed.weight
        if getattr(model, "zoo_shared_direction", None) is None:
            scale = weight.float().norm(dim=-1).mean()
            weight.add_((scale * d).to(weight.dtype))
            model.zoo_shared_direction = (scale * d).to(weight.dtype)
        sample = random_input_ids(model, batch=16, seq=64, seed=seed)
    else:
        if getattr(model, "zoo_shared_direction", None) is None:
            model.zoo_shared_direction = math.sqrt(hidden) * d
        sample = random_hidden(model, batch=16, seq=64, seed=seed)

    inputs = _router_inputs(model, layers, sample)
    for layer, x in zip(layers, inputs, strict=True):
        w = layer.router.weight
        w32 = w.float()
        bias = getattr(layer.router, "bias", None)
        logits = x @ w32.t()
        if isinstance(bias, torch.Tensor):
            logits = logits + bias.float()
        proj = (x @ d).mean()
        if proj.abs() < 1e-3 * x.norm(dim=-1).mean():
            raise ValueError(f"router input of {layer.router_path} has no shared direction")
        # Move each expert's mean logit to ramp * spread along d. This also cancels the
        # per-expert offsets the router already had (from its bias, from the mean that
        # attention leaves in the residual stream), so the skew is set by ``strength`` alone.
        spread = logits.std(dim=0).mean()
        ramp = torch.linspace(strength, -strength, layer.num_experts)
        shift = (ramp * spread - logits.mean(dim=0)) / proj
        w.copy_((w32 + shift[:, None] * d[None, :]).to(w.dtype))
    return model
