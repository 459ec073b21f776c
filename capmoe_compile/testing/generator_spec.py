"""The generator's spellings (routers, dispatches, expert forms, router caps) and the
specs drawn from them: :class:`LayerSpec` (one layer), :class:`ModelSpec` (a bf16 model of
several), and the expert forms' hidden activation (:func:`hidden_of`). See
:mod:`capmoe_compile.testing.generator`."""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

ROUTERS = (
    "softmax_topk",  # P = softmax(logits); W, S = topk(P)
    "softmax_topk_renorm",  # ... W renormalised over the selected
    "softmax_topk_3d",  # the same over [B, S, E] scores, flattened after the top-k
    "softmax_max_top1",  # P = softmax; W, S = max(P, dim=-1) (Switch)
    "logits_topk_softmax",  # S = topk(logits); W = softmax over the selected (GPT-OSS)
    "sigmoid_topk_renorm",  # P = sigmoid; W, S = topk(P), renormalised, scaled
    "sigmoid_bias_topk",  # S = topk(sigmoid + bias); W = P at S, renormalised (DeepSeek-V3)
    "scaled_logits",  # S = topk(logits / tau); W = softmax over selected; P = softmax(logits / tau)
    # issue 14's spellings
    "softmax_bias_topk",  # S = topk(softmax + bias); W = P at S, renormalised (Ernie-4.5)
    "logits_bias_topk",  # S = topk(logits + bias); W = sigmoid(logits at S), renormalised
    "softmax_argmax_top1",  # S = argmax(P); W = P at S (GShard/Switch by argmax)
)


TOP1 = ("softmax_max_top1", "softmax_argmax_top1")


DISPATCHES = (
    "gather_einsum",  # per pair: gather the expert's weights, einsum
    "grouped_mm",  # sort pairs by expert, torch._grouped_mm with offsets, unsort
    "dense_onehot",  # every expert on every token, combined by a dense [T, E] weight matrix
    "expert_loop",  # Python loop over experts, masks instead of gathers (static shapes)
    "sorted_index_add",  # sort pairs, gather weights per row, index_add_ back
    "bmm_capacity",  # [E, cap, H] buffers with cap = T: never drops (dropless)
    "bmm_own_capacity",  # [E, cap, H] with the model's own cap: drops late pairs
    # issue 14's spellings: data-dependent shapes and loops, bridged by capmoe's compiles
    "where_loop",  # for e in range(E): torch.where(ids == e), index_add_ (stacked weights)
    "modulelist_where",  # the same over an nn.ModuleList of expert modules
    "hit_loop",  # transformers' eager experts loop over the experts hit (nonzero), sentinel skip
    "hit_loop_item",  # Nemotron-H's: nonzero().squeeze(-1), .item(), empty skip, no sentinel
    # issue 23's: per-expert chunks from a data-dependent split (graph breaks without capture)
    "split_tolist",  # sort pairs by expert, torch.split(rows, counts.tolist()), unsort by index
    "split_index_add",  # the same chunks, weighted and index_add_-ed back to their tokens
)


# Capacity enforced in the ROUTER (issue 23): the gate weight of every pair past the layer's own
# capacity zeroed, the experts then run on every pair. Spellings of the pair's position:
ROUTER_CAPS = (
    "cumsum_flat",  # cumsum over the flattened [T*k, E] one-hot (token-major queue)
    "cumsum_slot",  # cumsum per top-k slot, earlier slots first (GShard's priority)
    "sort_rank",  # rank within its expert from a stable argsort by expert id
    "sort_score",  # rank within its expert by gate weight (argsort by weight, then by expert)
)


# binding: C = T*k/(2E); moderate: the smallest quarter multiple of T*k/E that drops nothing on
# the check's own inputs (binds for other inputs); never: C = T (no expert can get more: dropless)
CAP_KINDS = ("binding", "moderate", "never")


# gptoss: interleaved gate/up, gate clamped to LIMIT, up to [-LIMIT, LIMIT],
# g * sigmoid(ALPHA * g) * (up + 1) (GPT-OSS); softcap: tanh-capped SwiGLU (Inkling-2)
FORMS = ("gate_up", "up_gate", "gate_and_up", "mlp", "gptoss", "softcap")
LIMIT, ALPHA, SOFTCAP = 0.8, 1.702, (4.0, 25.0)


# The generator's own table (not capmoe's ``experts.ACTIVATIONS``): its layers and oracle
# must not share code with what they test.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x) ** 2,
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    router: str
    dispatch: str
    form: str
    act: str
    bias: bool
    transposed: bool  # weights stored [E, in, out] instead of nn.Linear's [E, out, in]
    shared: bool  # a dense shared expert added outside the routed part
    E: int
    k: int
    H: int
    F: int
    dtype: str
    dynamic: bool
    seed: int
    router_cap: str = ""  # one of ROUTER_CAPS: capacity enforced in the router, or none
    cap: str = ""  # one of CAP_KINDS, with router_cap

    @property
    def ident(self) -> str:
        rcap = f"+{self.router_cap}.{self.cap}" if self.router_cap else ""
        return (
            f"{self.router}{rcap}-{self.dispatch}-{self.form}-{self.act}"
            f"{'-b' if self.bias else ''}"
            f"{'-t' if self.transposed else ''}{'-sh' if self.shared else ''}-E{self.E}k{self.k}"
            f"-{self.dtype}{'-dyn' if self.dynamic else ''}-s{self.seed}"
        )

    @property
    def expected_match(self) -> bool:
        """Whether SPEC lets capmoe rewrite this layer at all (not whether it does): not the
        layer's own capacity in the dispatch, and not a capacity
        in the router that can bind (SPEC: token-wise routing is part of what a match
        proves). A router cap of ``C = T`` never binds: that layer is dropless."""
        own_cap = bool(self.router_cap) and self.cap != "never"
        return self.dispatch != "bmm_own_capacity" and not own_cap


def random_spec(rng: random.Random, seed: int) -> LayerSpec:
    router = rng.choice(ROUTERS)
    dispatch = rng.choice(DISPATCHES)
    E = rng.choice((4, 6, 8, 16))
    k = 1 if router in TOP1 else rng.choice((1, 2, 2, 3, 4))
    k = min(k, E // 2)
    form = rng.choice(FORMS)
    act = rng.choice(tuple(ACTIVATIONS))
    return LayerSpec(
        router=router,
        dispatch=dispatch,
        form=form,
        act="silu" if form in ("gptoss", "softcap") else act,  # their gating is their own
        bias=rng.random() < 0.3,
        transposed=rng.random() < 0.5,
        shared=rng.random() < 0.2,
        E=E,
        k=k,
        H=rng.choice((16, 24, 32)),
        F=rng.choice((16, 32, 48)),
        # torch._grouped_mm has no fp32 meta kernel on CPU: that spelling is bf16 only
        dtype="bfloat16" if dispatch == "grouped_mm" or rng.random() < 0.15 else "float32",
        dynamic=rng.random() < 0.25,
        seed=seed,
        **_router_cap_draw(random.Random(seed * 31 + 7)),
    )


ROUTER_CAP_SHARE = 0.15  # of random layers


def _router_cap_draw(rng: random.Random) -> dict[str, str]:
    if rng.random() >= ROUTER_CAP_SHARE:
        return {}
    return {"router_cap": rng.choice(ROUTER_CAPS), "cap": rng.choice(CAP_KINDS)}


def specs(n: int, seed: int = 0) -> list[LayerSpec]:
    rng = random.Random(seed)
    return [random_spec(rng, seed * 1_000_003 + i) for i in range(n)]


def hidden_of(spec: LayerSpec, h_in: torch.Tensor, h_gate: torch.Tensor | None) -> torch.Tensor:
    """The expert's hidden activation for ``spec``'s form, from its in (and gate) projection."""
    act = ACTIVATIONS[spec.act]
    form = spec.form
    if form == "gate_up":
        g, u = h_in.chunk(2, dim=-1)
        return act(g) * u
    if form == "up_gate":
        u, g = h_in.chunk(2, dim=-1)
        return act(g) * u
    if form == "gate_and_up":
        return act(h_gate) * h_in
    if form == "gptoss":
        g, u = h_in[..., ::2], h_in[..., 1::2]
        g, u = g.clamp(max=LIMIT), u.clamp(min=-LIMIT, max=LIMIT)
        return (u + 1) * (g * torch.sigmoid(g * ALPHA))
    if form == "softcap":
        g, u = h_in.float().chunk(2, dim=-1)
        c_g, c_u = SOFTCAP
        inner = torch.tanh(g / c_g) * c_g * torch.sigmoid(g) * (torch.tanh(u / c_u) * c_u)
        return inner.to(h_in.dtype)
    return act(h_in)


LOOPS = (
    "expert_loop",
    "where_loop",
    "modulelist_where",
    "hit_loop",
    "hit_loop_item",
    "split_tolist",
    "split_index_add",
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Two or more generated layers in sequence (``h = h + layer(h)``), all in one dtype (bf16
    in the generator's stream: issue 23's multi-layer bf16 models)."""

    layers: tuple[LayerSpec, ...]
    seed: int

    @property
    def ident(self) -> str:
        inner = ",".join(
            f"{s.router}{'+' + s.router_cap + '.' + s.cap if s.router_cap else ''}/{s.dispatch}"
            f"/{s.form}/E{s.E}k{s.k}"
            for s in self.layers
        )
        return f"model{len(self.layers)}[{inner}]-{self.dtype}-s{self.seed}"

    @property
    def dtype(self) -> str:
        return self.layers[0].dtype

    @property
    def dynamic(self) -> bool:
        return False

    @property
    def expected_match(self) -> bool:
        """Whether SPEC lets capmoe rewrite any of its layers."""
        return any(s.expected_match for s in self.layers)


def random_model(rng: random.Random, seed: int, dtype: str = "bfloat16") -> ModelSpec:
    """2 or 3 random layers of one width and dtype."""
    n = rng.choice((2, 2, 3))
    H = rng.choice((16, 24, 32))
    layers = []
    for i in range(n):
        s = random_spec(rng, seed * 10 + i)
        E = min(s.E, 8) if s.dispatch in LOOPS else s.E
        k = 1 if s.router in TOP1 else min(s.k, E // 2)
        layers.append(dataclasses.replace(s, H=H, E=E, k=k, dtype=dtype, dynamic=False))
    return ModelSpec(tuple(layers), seed)


Case = LayerSpec | ModelSpec


MODEL_EVERY = 50  # every this many cases in ``cases`` is a bf16 multi-layer model


def cases(n: int, seed: int = 0, model_every: int = MODEL_EVERY) -> list[Case]:
    """``specs(n, seed)`` with every ``model_every``-th one (offset 7) replaced by a bf16
    multi-layer model drawn from its own seeded stream."""
    out: list[Case] = list(specs(n, seed))
    for i in range(n):
        if model_every and i % model_every == 7 % model_every:
            out[i] = random_model(random.Random(seed * 1_000_003 + i), seed * 1_000_003 + i)
    return out
