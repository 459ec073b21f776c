"""Tiny offline MoE models for tests, the demo and benchmarks.

Two kinds of model live here:

- :func:`build` makes a tiny ``transformers`` causal LM of one MoE family from a config (random
  weights, nothing downloaded), in eval mode, with the requested experts implementation.
- :func:`plain_moe` makes a plain-PyTorch MoE layer written one of the common ways people write
  them by hand (a ``ModuleList`` loop, stacked weights with ``bmm``, a Switch-style top-1 layer).

The families' config recipes are in ``zoo_families``, the plain layers in ``zoo_plain`` (both
re-exported here).

Random routers are nearly balanced; trained ones are not (the straggler effect the paper is about).
:func:`skew_router_` makes a model's routing skewed the way trained routers are, and
:func:`expert_loads` measures the per-layer expert loads in eager mode, so the skew can be reported.

``transformers`` is imported lazily: :func:`plain_moe` works without it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from capmoe_compile.testing.zoo_families import _FAMILY_KWARGS
from capmoe_compile.testing.zoo_families import CORE_FAMILIES as CORE_FAMILIES
from capmoe_compile.testing.zoo_families import EXTRA_FAMILIES as EXTRA_FAMILIES
from capmoe_compile.testing.zoo_families import FAMILIES as FAMILIES
from capmoe_compile.testing.zoo_families import MAIN_FAMILIES as MAIN_FAMILIES
from capmoe_compile.testing.zoo_plain import PLAIN_KINDS as PLAIN_KINDS
from capmoe_compile.testing.zoo_plain import plain_moe as plain_moe

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
