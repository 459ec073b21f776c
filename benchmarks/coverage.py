"""Coverage of the capmoe passes: every MoE family of the installed transformers, and plain
PyTorch MoE layers written the ways other libraries write them (``tests/moe_styles.py``).

For every family (or style) and every experts implementation it supports it records:

- ``build``: whether a tiny random-weight model builds offline (and the error if not);
- ``eager_graphs`` / ``capmoe_graphs``: graphs Dynamo makes with ``backend="eager"`` and with the
  capmoe passes (a graph break adds one);
- ``explain``: ``capmoe_compile.explain(model)(**inputs)``: layers matched, layers left and why;
- ``off``: capacity off, the model compiled with the capmoe passes against eager (allclose);
- ``on``: capacity on (``capacity_factor=0.5``, ``policy="score"``) for the matched layers,
  against an eager oracle that applies ``capmoe_compile.route`` to the model's own router
  outputs (below).

How the families are found (``moe_families``): every ``model_type`` of transformers'
``CONFIG_MAPPING_NAMES`` whose default config has an expert-count attribute
(``num_experts``, ``num_local_experts``, ``n_routed_experts``, ``moe_num_experts``) at its
top level or in a plain dict attribute (DBRX's ``ffn_config``) is a family. A config that has
one only inside a sub-config of another registered ``model_type`` (a multimodal wrapper's
``text_config``) is that sub-config's family, listed as a wrapper and not built twice. Built
through ``AutoModelForCausalLM`` where registered, else the seq2seq LM, else ``AutoModel``;
a family with no text model in the registry is listed as not built. A family counts as MoE
at the tiny config when a top-k (or ``max``/``argmax``) over a last dimension of ``E`` (or of
``E`` plus its zero-computation experts, LongCat-Flash's ``zero_expert_num``) runs in its eager
forward; the table says so where none does.

The eager oracle (``--on``): a forward pre-hook on each transformers experts module (a class
decorated with ``use_experts_implementation``: ``forward(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])``) replaces the model's own selection ``S``/``W`` with
``capmoe_compile.route(P, S, W, ...)``; dropped pairs keep a valid expert id with weight 0, so
they contribute nothing. ``P`` comes from the top-k that produced ``S`` (recorded during the
eager forward by a ``TorchFunctionMode``), by SPEC.md's rules, independently of the passes:
the top-k's scores when they are a softmax or sigmoid output; that output when the scores are
it plus a token-independent bias (masked entries aside: DeepSeek-V3's correction bias and
group mask); ``softmax`` of the scores when they are a linear layer's raw logits; else the
scores themselves (the generic rule). Families whose experts are not such a module
(``nn.ModuleList`` experts, routers that scale the expert input) have no oracle here: the
table says "no oracle". The styles of ``tests/moe_styles.py`` carry their own oracle.

By default the rewritten graphs run as FX code (the passes' rewrite, no Inductor: cheap, and
where a miscompile of the passes shows); ``--inductor`` compiles with ``backend="capmoe"``
proper instead (slow on CPU: about a minute per model).

    python -m benchmarks.coverage                       # everything, results/coverage.{json,md}
    python -m benchmarks.coverage --families mixtral,olmoe --impl grouped_mm
    python -m benchmarks.coverage --styles-only --jobs 2

Each family runs in a subprocess with a timeout (``--timeout``); results are merged into the
JSON file after each family, so an interrupted run resumes with ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.common import with_isa

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMPLS = ("grouped_mm", "batched_mm", "eager")
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
GAMMA = 0.5
POLICY = "score"
BATCH, SEQ = 2, 16  # T = 32 rows per MoE layer
NUM_EXPERTS, TOP_K = 8, 2


# --------------------------------------------------------------------------------------------
# which families
# --------------------------------------------------------------------------------------------


def _expert_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """Expert-count keys in a config dict, descending into plain dicts (not sub-configs)."""
    hits = {}
    for k, v in d.items():
        if k in EXPERT_COUNT_NAMES:
            hits[prefix + k] = v
        elif isinstance(v, dict) and "model_type" not in v:
            hits.update(_expert_keys(v, prefix + k + "."))
    return hits


def _builder(name: str) -> str | None:
    from transformers.models.auto import modeling_auto

    if name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    if name in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq_lm"
    if name in modeling_auto.MODEL_MAPPING_NAMES:
        return "base"
    return "module" if _module_class(name) is not None else None


def _module_class(name: str):
    """A text model class for a config registered without a model (a multimodal model's text
    part): the ``PreTrainedModel`` of the config's own modeling module whose ``config_class``
    is this config, a ``...ForCausalLM`` first, then a ``...Model``."""
    import importlib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cfg_cls = CONFIG_MAPPING[name]
        mod = importlib.import_module(cfg_cls.__module__.replace(".configuration_", ".modeling_"))
    except Exception:  # noqa: BLE001
        return None
    cands = [
        c
        for c in vars(mod).values()
        if isinstance(c, type) and getattr(c, "config_class", None) is cfg_cls
    ]
    for suffix in ("ForCausalLM", "TextModel", "Model"):
        for c in cands:
            if c.__name__.endswith(suffix) and "Vision" not in c.__name__:
                return c
    return None


def _mentions_experts(name: str) -> bool:
    """Whether the config module of ``name`` mentions an expert-count attribute at all (read as
    text, not imported: importing all ~400 config modules costs most of a minute). Only these
    configs are instantiated and inspected."""
    import importlib.util

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    try:
        spec = importlib.util.find_spec(f"transformers.models.{model_type_to_module_name(name)}")
        folder = Path(spec.origin).parent
        text = "".join(p.read_text() for p in folder.glob("configuration_*.py"))
    except Exception:  # noqa: BLE001 - unreadable: inspect it the slow way
        return True
    return any(n in text for n in EXPERT_COUNT_NAMES)


def _family_keys(name: str, cfg) -> tuple[dict[str, Any], list[str]]:
    """The expert-count keys of a config that are its own (top level, plain dicts, and
    sub-configs of no registered type of their own), and the registered model types of its
    sub-configs that have some (a wrapper's text model)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    top = _expert_keys(cfg.to_dict())
    owners = []
    for sub in getattr(cfg, "sub_configs", {}) or {}:
        sc = getattr(cfg, sub, None)
        if sc is None or not hasattr(sc, "to_dict") or not _expert_keys(sc.to_dict()):
            continue
        sub_type = getattr(sc, "model_type", "") or ""
        if sub_type in CONFIG_MAPPING_NAMES and sub_type != name:
            owners.append(sub_type)
        else:  # a part of this model's own config (DBRX's ffn_config)
            top.update({f"{sub}.{k}": v for k, v in _expert_keys(sc.to_dict()).items()})
    return top, owners


def is_family(name: str) -> bool:
    """Whether ``name`` is an MoE family by :func:`moe_families`' rule, with a builder."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[name]()
    except Exception:  # noqa: BLE001
        return False
    top, owners = _family_keys(name, cfg)
    own = bool(top) and not (owners and not any("." not in k for k in top))
    return own and _builder(name) is not None


def moe_families() -> dict[str, dict[str, Any]]:
    """``{model_type: info}`` for every MoE family of the installed transformers.

    ``info``: ``expert_keys`` (names and default values), ``builder`` (``causal_lm``,
    ``seq2seq_lm``, ``base``, ``module`` or ``None``) and ``wrappers`` (registered configs
    that only hold this family as a sub-config). Configs whose default fails are skipped.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    families: dict[str, dict[str, Any]] = {}
    wrappers: dict[str, list[str]] = {}
    for name in CONFIG_MAPPING_NAMES:
        if not _mentions_experts(name):
            continue
        try:
            cfg = CONFIG_MAPPING[name]()
        except Exception:  # noqa: BLE001 - a config that cannot be made is no family we can test
            continue
        top, owners = _family_keys(name, cfg)
        if owners and not any("." not in k for k in top):
            for o in owners:
                wrappers.setdefault(o, []).append(name)
        elif top:
            families[name] = {"expert_keys": top}
    for name, info in families.items():
        info["builder"] = _builder(name)
        info["wrappers"] = sorted(wrappers.get(name, []))
    return dict(sorted(families.items()))


# --------------------------------------------------------------------------------------------
# tiny configs
# --------------------------------------------------------------------------------------------

# Set where the default config has the attribute. Sizes: hidden 64, 4 heads, 8 experts, top-2.
_TINY = {
    "hidden_size": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "d_ff": 128,
    "moe_intermediate_size": 64,
    "expert_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 4,  # no GQA: MLA models want as many as query heads
    "head_dim": 16,
    "d_kv": 16,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "num_experts_per_tok": TOP_K,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    "top_k": TOP_K,
    "first_k_dense_replace": 0,
    "first_k_dense": 0,
    "decoder_sparse_step": 1,
    "sparse_step": 1,
    "moe_layer_freq": 1,
    "mlp_only_layers": [],
    "n_shared_experts": 1,
    "zero_expert_num": 4,  # LongCat-Flash's zero-computation experts (default 256 beside 8)
    "num_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,  # nope + rope: stored, not derived, by some configs (LongCat-Flash)
    "v_head_dim": 16,
    "use_cache": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "sliding_window": 16,
    "router_jitter_noise": 0.0,
    "router_aux_loss_coef": 0.0,
    "output_router_logits": False,
    "is_moe": True,
}


def _shrink_lists(cfg, n_default: int | None) -> None:
    """Per-layer lists sized for the default depth: keep the last entries (dense layers and
    other special layers come first in every config seen)."""
    if not n_default:
        return
    n = getattr(cfg, "num_hidden_layers", None) or 2
    for k, v in list(vars(cfg).items()):
        if isinstance(v, list) and len(v) == n_default and n_default != n:
            with contextlib.suppress(Exception):
                setattr(cfg, k, v[-n:])


def _apply(cfg, overrides: dict[str, Any]) -> None:
    for k, v in overrides.items():
        if hasattr(cfg, k) or k in getattr(cfg, "attribute_map", {}):
            with contextlib.suppress(Exception):
                setattr(cfg, k, v)


def tiny_config(family: str, num_layers: int = 2):
    """A tiny config of ``family``: the defaults with :data:`_TINY` applied where present,
    ``E = 8`` under every expert-count name it has, per-layer lists cut to 2 layers."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family)
    n_default = getattr(cfg, "num_hidden_layers", None)
    over = dict(_TINY)
    for name in (
        "num_hidden_layers",
        "num_layers",
        "num_decoder_layers",
        "encoder_layers",
        "decoder_layers",
    ):
        over[name] = num_layers
    for name in EXPERT_COUNT_NAMES:
        over[name] = NUM_EXPERTS
    _apply(cfg, over)
    ffn = getattr(cfg, "ffn_config", None)  # dbrx
    if ffn is not None:
        if isinstance(ffn, dict):
            ffn.update({"moe_num_experts": NUM_EXPERTS, "moe_top_k": TOP_K, "ffn_hidden_size": 64})
        else:
            _apply(ffn, {"moe_num_experts": NUM_EXPERTS, "moe_top_k": TOP_K, "ffn_hidden_size": 64})
    attn = getattr(cfg, "attn_config", None)
    if attn is not None and not isinstance(attn, dict):
        _apply(attn, {"kv_n_heads": 2})
    elif isinstance(attn, dict):
        attn["kv_n_heads"] = 2
    if getattr(cfg, "n_heads", None) is not None:
        _apply(cfg, {"n_heads": 4, "d_model": 64, "n_layers": 2, "max_seq_len": 256})
    if getattr(cfg, "qk_rope_head_dim", None):  # MLA: rotary dims are head_dim
        _apply(cfg, {"head_dim": cfg.qk_rope_head_dim})
    _shrink_lists(cfg, n_default)
    # some configs keep the expert count in a per-layer list
    for k in ("moe_num_experts",):
        if isinstance(getattr(cfg, k, None), list):
            setattr(cfg, k, [NUM_EXPERTS] * len(getattr(cfg, k)))
    return cfg


# --------------------------------------------------------------------------------------------
# building and running one family
# --------------------------------------------------------------------------------------------


def supported_impls(model: torch.nn.Module) -> list[str]:
    """Experts implementations the model can switch between: all three where one of its
    modules is a transformers experts module (``use_experts_implementation``), else the model
    as written (``eager``)."""
    return list(IMPLS) if experts_modules(model) else ["eager"]


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{path: module}`` of the transformers experts modules (the decorator sets these)."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "_is_expert_parallel") and hasattr(m, "has_gate") and hasattr(m, "config")
    }


def _plain_experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Experts modules transformers did not decorate but that take the same arguments
    (``forward(hidden_states, top_k_index, top_k_weights)``, Step-3.5's): the oracle hooks
    them the same way."""
    import inspect

    out = {}
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Experts"):
            continue
        params = list(inspect.signature(type(m).forward).parameters)
        if params[1:4] == ["hidden_states", "top_k_index", "top_k_weights"]:
            out[name] = m
    return out


#: The dtype models and styles are built in (``--dtype``; set in each worker).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE = torch.float32


def build_family(
    family: str, impl: str, builder: str = "causal_lm", seed: int = 0, num_layers: int = 2
):
    """A tiny random-weight model of ``family`` in eval mode, in ``DTYPE`` (fp32 unless
    ``--dtype``), with ``impl`` experts."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = tiny_config(family, num_layers)
    cls = {"causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM}.get(
        builder, AutoModel
    )
    if builder == "module":
        cls = _ModuleBuilder(_module_class(family))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = cls.from_config(cfg, dtype=DTYPE, experts_implementation=impl)
        except (TypeError, ValueError) as e:
            if "experts" not in str(e):
                raise
            # no switchable experts: the model as written (a fresh config: the failed
            # attempt left its choice in the old one)
            model = cls.from_config(
                tiny_config(family, num_layers), dtype=DTYPE, experts_implementation="eager"
            )
        _randomize_buffers_and_biases_(model, seed)
    model.eval()
    with contextlib.suppress(Exception):
        model.set_experts_implementation(impl)
    for m in experts_modules(model).values():  # a standalone experts module (FACTS.md)
        if getattr(m.config, "_experts_implementation", None) != impl:
            with contextlib.suppress(Exception):
                m.config._experts_implementation = impl
    return model


class _ModuleBuilder:
    """``from_config`` for a model class outside the auto registry (its ``_from_config``)."""

    def __init__(self, cls):
        self.cls = cls

    def from_config(self, cfg, **kwargs):
        return self.cls._from_config(cfg, **kwargs)


@torch.no_grad()
def _randomize_buffers_and_biases_(model: torch.nn.Module, seed: int) -> None:
    """Zero-initialised router biases (DeepSeek-V3's ``e_score_correction_bias``) made random,
    so bias-adjusted selections differ from top-k of the scores."""
    gen = torch.Generator().manual_seed(seed + 7)
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if "correction_bias" in name or name.endswith("expert_bias"):
            t.copy_(0.3 * torch.randn(t.shape, generator=gen).to(t.dtype))


def model_inputs(model: torch.nn.Module, builder: str, seed: int = 0) -> dict[str, Any]:
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or 256
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 256), (BATCH, SEQ), generator=gen)
    out: dict[str, Any] = {"input_ids": ids}
    if builder == "seq2seq_lm":
        out["decoder_input_ids"] = torch.randint(3, min(vocab, 256), (BATCH, SEQ), generator=gen)
    if getattr(cfg, "use_cache", None) is not None:
        out["use_cache"] = False
    return out


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    raise TypeError(f"no tensor output in {type(out).__name__}")


def close(got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> tuple[bool, float]:
    """allclose at ``tol`` (default 1e-4 in fp32, 3e-2 in 16-bit) relative to the output's
    scale; returns (ok, max |diff|). 16-bit means the output's dtype or the models' (``--dtype
    bf16``): a bf16 model may return fp32 logits (Beam does), computed from bf16 activations,
    whose rounding the fp32 tolerance would call wrong."""
    if tol is None:
        tol = 1e-4 if want.dtype == torch.float32 and DTYPE == torch.float32 else 3e-2
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return False, float("inf")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item())
    ok = bool(torch.allclose(got, want, atol=tol * scale, rtol=tol)) and diff == diff
    return ok, diff


# --------------------------------------------------------------------------------------------
# the eager oracle
# --------------------------------------------------------------------------------------------

_NAMES_TOPK = {"topk"}
_NAMES_MAX = {"max", "argmax"}
_NAMES_PROB = {"softmax", "sigmoid", "_softmax"}
_NAMES_LINEAR = {"linear", "matmul", "__matmul__", "mm", "addmm"}


class RouterProbe(TorchFunctionMode):
    """Records, during an eager forward, every top-k/max over a last dimension of ``E`` (with
    its scores), and the softmax/sigmoid/linear outputs whose last dimension is ``E``."""

    def __init__(self, num_experts: set[int]):
        super().__init__()
        self.E = num_experts
        self.topks: list[dict[str, Any]] = []
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        try:
            if name in _NAMES_TOPK | _NAMES_MAX:
                self._topk(name, args, kwargs, out)
            elif (
                isinstance(out, torch.Tensor)
                and out.dim() >= 2
                and out.is_floating_point()
                and out.shape[-1] in self.E
            ):
                kind = "prob" if name in _NAMES_PROB else "linear" if name in _NAMES_LINEAR else ""
                self.outputs.append((kind or name, out.detach().clone()))
        except Exception:  # noqa: BLE001 - the probe never changes what the model computes
            pass
        return out

    def _topk(self, name, args, kwargs, out) -> None:
        s = args[0] if args else kwargs.get("input")
        if not isinstance(s, torch.Tensor) or s.dim() < 1 or not s.is_floating_point():
            return
        if name == "topk":
            k = args[1] if len(args) > 1 else kwargs.get("k")
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        else:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            k = 1
        if dim is None or dim not in (-1, s.dim() - 1) or s.shape[-1] not in self.E:
            if dim is not None and s.shape[dim] in self.E and s.dim() >= 2:
                self.topks.append({"scores": None, "over": "tokens", "k": k})
            return
        if name == "argmax":
            idx = out
        elif isinstance(out, tuple):
            idx = out[1]
        else:
            idx = out.indices
        self.topks.append(
            {
                "scores": s.detach().clone(),
                "indices": idx.detach().clone(),
                "k": k,
                "outputs": len(self.outputs),
                "over": "experts",
            }
        )


def probs_for(scores: torch.Tensor, outputs: list[tuple[str, torch.Tensor]]):
    """``P`` for a top-k over ``scores`` [T, E] (SPEC.md), and which rule gave it.

    ``outputs``: the ``[..., E]`` float results of the ops that ran before the top-k, newest
    last, as ``(kind, tensor)`` with kind ``prob`` (softmax/sigmoid), ``linear`` or the op's
    name."""
    E = scores.shape[-1]
    s = scores.reshape(-1, E).float()
    cands = [(k, o.reshape(-1, E).float()) for k, o in reversed(outputs) if o.numel() == s.numel()]
    for kind, o in cands:
        if kind == "prob" and torch.allclose(s, o, atol=1e-6, rtol=1e-5):
            return o, "the scores (a softmax/sigmoid output)"
    free = torch.isfinite(s) & (s != 0)  # entries masked by group limiting aside
    masked_ok = bool(free.sum() >= s.shape[0])
    for kind, o in cands:
        if not masked_ok:
            break
        d = s - o
        big = torch.where(free, d, torch.full_like(d, float("nan")))
        lo = torch.nan_to_num(big, nan=float("inf")).amin(0)
        hi = torch.nan_to_num(big, nan=float("-inf")).amax(0)
        spread = torch.where(torch.isfinite(hi - lo), hi - lo, torch.zeros_like(lo))
        if not bool((spread < 1e-5).all()):
            continue
        if bool(d[free].abs().max() > 1e-6):  # s = o + a per-expert bias (masked aside)
            if kind == "linear":
                return torch.softmax(o, dim=-1), "softmax of raw logits (a selection bias aside)"
            return o, f"{kind} output without a token-independent selection bias"
        if kind == "prob":
            return o, "softmax/sigmoid output, masked entries aside (group limiting)"
    for kind, o in cands:
        if kind == "linear" and torch.allclose(s, o, atol=1e-6, rtol=1e-5):
            return torch.softmax(s, dim=-1), "softmax of raw logits"
    return s, "the scores the top-k ranked by (generic)"


class Oracle:
    """Capacity applied to the model's own ``S``/``W`` at every hooked experts module."""

    def __init__(self, model, layer_paths: list[str], capacity_factor, policy=POLICY):
        self.model = model
        self.capacity_factor = capacity_factor
        self.policy = policy
        self.mods = experts_modules(model) or _plain_experts_modules(model)
        self.hooked: dict[str, str] = {}  # experts path -> matched layer name
        for path in self.mods:
            for name in layer_paths:
                if path == name or path.startswith(name + "."):
                    self.hooked[path] = name
        E = {getattr(m, "num_experts", NUM_EXPERTS) for m in self.mods.values()} | {NUM_EXPERTS}
        self.probe = RouterProbe(E)
        self.rules: dict[str, str] = {}
        self.dropped: dict[str, int] = {}
        self.errors: list[str] = []

    def _hook(self, path):
        def pre(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs.get(n) for n in names[len(args) :]]
            if len(vals) < 3 or any(v is None for v in vals[:3]):
                self.errors.append(f"{path}: experts call is not (hidden, ids, weights)")
                return None
            x, ids, w = vals[:3]
            E = module.num_experts
            rec = None
            for r in reversed(self.probe.topks):
                if r["over"] != "experts" or r["scores"].shape[-1] != E:
                    continue
                if r["indices"].numel() == ids.numel() and torch.equal(
                    r["indices"].reshape(ids.shape).long(), ids.long()
                ):
                    rec = r
                    break
            if rec is None:
                rec = self._sequential_picks(ids, E)
            if rec is None:
                self.errors.append(f"{path}: no top-k over E={E} produced the experts' ids")
                return None
            P, rule = probs_for(rec["scores"], self.probe.outputs[: rec["outputs"]])
            rule += rec.get("rule", "")
            self.rules[path] = rule
            from capmoe_compile import config, route

            ids2, w2 = route(
                P,
                ids,
                w.float(),
                capacity_factor=self.capacity_factor,
                policy=self.policy,
                min_tokens=config.min_tokens,
            )
            drop = ids2 >= E
            self.dropped[path] = self.dropped.get(path, 0) + int(drop.sum())
            ids_new = torch.where(drop, ids.long(), ids2.long()).to(ids.dtype)
            w_new = torch.where(drop, torch.zeros_like(w2), w2).to(w.dtype)
            args = list(args)
            for i, (n, v) in enumerate(zip(names, (x, ids_new, w_new), strict=True)):
                if i < len(args):
                    args[i] = v
                else:
                    kwargs[n] = v
            return tuple(args), kwargs

        return pre

    def _sequential_picks(self, ids: torch.Tensor, E: int) -> dict[str, Any] | None:
        """A top-2 made of two top-1 picks (PhiMoE's sparsemixer): consecutive max records
        whose indices, concatenated, are the experts' ids, the second over the first's scores
        with the first pick set to -inf. Then S ranks the first's scores: P by their rule."""
        recs = [r for r in self.probe.topks if r["over"] == "experts" and r["k"] == 1]
        for a, b in zip(reversed(recs[:-1]), reversed(recs[1:]), strict=True):
            if a["scores"].shape[-1] != E or b["scores"].shape != a["scores"].shape:
                continue
            ia, ib = a["indices"].reshape(-1, 1).long(), b["indices"].reshape(-1, 1).long()
            if ia.numel() * 2 != ids.numel():
                continue
            if not torch.equal(torch.cat([ia, ib], -1), ids.reshape(-1, 2).long()):
                continue
            sa = a["scores"].reshape(-1, E)
            want = sa.scatter(-1, ia, float("-inf"))
            if torch.equal(b["scores"].reshape(-1, E), want):
                return {**a, "rule": " (two sequential top-1 picks over them)"}
        return None

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        handles = [
            self.mods[p].register_forward_pre_hook(self._hook(p), with_kwargs=True)
            for p in self.hooked
        ]
        try:
            with self.probe:
                return first_tensor(self.model(**inputs))
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------------------------
# graphs, explain, compile
# --------------------------------------------------------------------------------------------


class PassesBackend:
    """The capmoe passes on every graph, the rewritten graph run as FX code (no Inductor)."""

    def __init__(self):
        from capmoe_compile.bridge import capture_context

        self.graphs = 0
        self.reports: list = []
        self.backend_ctx_ctor = capture_context  # the capmoe backend's graph-break bridges

    def __call__(self, gm, example_inputs):
        from capmoe_compile.passes import run_passes

        self.graphs += 1
        self.reports.extend(run_passes(gm, example_inputs, None))
        return gm.forward

    def drop(self, dropped: list) -> None:
        """Reports of graphs the bridge dropped (traced with the capture flags, then again
        without them): their layers run as written, so a match there is none (as ``explain``
        reports it: "matched when traced with the capture flags; ...")."""
        gone = {id(r): why for reports, why in dropped for r in reports}
        self.reports = [
            r
            if id(r) not in gone
            else dataclasses.replace(
                r,
                matched=False,
                reason=(r.reason if not r.matched else "matched when traced with the capture flags")
                + f"; the graph was traced again without the capture flags ({gone[id(r)]})",
            )
            for r in self.reports
        ]


def eager_graph_count(model, inputs) -> int:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cc = CompileCounter()
    with torch.no_grad():
        torch.compile(model, backend=cc)(**inputs)
    torch._dynamo.reset()
    return cc.frame_count


def _short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg[:limit]


def _layer(r) -> dict[str, Any]:
    return {
        "name": r.name,
        "E": r.num_experts,
        "k": r.top_k,
        "router": r.router,
        "dispatch": r.dispatch,
        "experts": r.experts,
        "reason": r.reason,
    }


def check_model(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    oracle: Callable[[list[str], float | None], Callable[[], torch.Tensor]] | None,
    inductor: bool = False,
    capacity_on: bool = True,
    use_explain: bool = True,
    count_eager: bool = True,
) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring)."""
    import capmoe_compile
    from capmoe_compile import backend as capmoe_backend
    from capmoe_compile import config

    rec: dict[str, Any] = {}
    with torch.no_grad():
        want = first_tensor(model(**inputs))
    t0 = time.perf_counter()
    try:
        rec["eager_graphs"] = eager_graph_count(model, inputs) if count_eager else None
    except Exception as e:  # noqa: BLE001
        rec["eager_graphs"] = None
        rec["eager_graphs_error"] = _short(e)
    if use_explain:
        try:
            rep = capmoe_compile.explain(model)(**inputs)
            rec["explain"] = {
                "source": "explain",
                "graphs": rep.graphs,
                "matched": [_layer(r) for r in rep.layers],
                "left": [_layer(r) for r in rep.unmatched],
            }
        except Exception as e:  # noqa: BLE001
            rec["explain"] = {"error": _short(e)}
    torch._dynamo.reset()
    try:
        if inductor:
            before = capmoe_backend.compile_count()
            compiled = torch.compile(model, backend="capmoe")
            with torch.no_grad():
                got = first_tensor(compiled(**inputs))
            rec["capmoe_graphs"] = capmoe_backend.compile_count() - before
            matched = rec.get("explain", {}).get("matched", [])
            names = [m["name"] for m in matched]
        else:
            from capmoe_compile.bridge import DROPPED_SINKS

            be = PassesBackend()
            compiled = torch.compile(model, backend=be)
            dropped: list = []  # graphs traced with the capture flags, then traced again
            DROPPED_SINKS.append(dropped)
            try:
                with torch.no_grad():
                    got = first_tensor(compiled(**inputs))
            finally:
                DROPPED_SINKS.remove(dropped)
            be.drop(dropped)
            rec["capmoe_graphs"] = be.graphs
            names = [r.name for r in be.reports if r.matched]
            rec["passes_matched"] = names
            rec["passes_left"] = [[r.name, r.reason] for r in be.reports if not r.matched]
            if not use_explain:
                rec["explain"] = {
                    "source": "the passes' reports (run_passes, as explain calls it)",
                    "graphs": be.graphs,
                    "matched": [_layer(r) for r in be.reports if r.matched],
                    "left": [_layer(r) for r in be.reports if not r.matched],
                }
        ok, diff = close(got, want)
        rec["off"] = {"ok": ok, "max_diff": diff}
    except Exception as e:  # noqa: BLE001
        rec["off"] = {"ok": None, "error": _short(e), "trace": traceback.format_exc()[-1500:]}
        torch._dynamo.reset()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec
    if capacity_on and names:
        if oracle is None:
            rec["on"] = {"ok": None, "error": "no oracle for this model"}
        else:
            try:
                ref = oracle(names, GAMMA)
                want_on, info = ref()
                with config.patch(capacity_factor=GAMMA, policy=POLICY), torch.no_grad():
                    got_on = first_tensor(compiled(**inputs))
                ok_on, diff_on = close(got_on, want_on)
                rec["on"] = {
                    "ok": ok_on,
                    "max_diff": diff_on,
                    "effect": (want_on.float() - want.float()).abs().max().item(),
                    **info,
                }
                if info.get("unhooked"):  # inconclusive: capacity on some layers only
                    rec["on"]["ok"] = None
                    rec["on"]["error"] = "no oracle for " + ", ".join(info["unhooked"])
                elif not info.get("dropped"):
                    rec["on"]["ok"] = None
                    rec["on"]["error"] = "the oracle dropped nothing (vacuous)"
            except Exception as e:  # noqa: BLE001
                rec["on"] = {"ok": None, "error": _short(e)}
    torch._dynamo.reset()
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def hf_oracle(model, inputs):
    """The oracle factory for a transformers model (see :class:`Oracle`)."""

    def make(names: list[str], gamma):
        orc = Oracle(model, names, gamma)

        def run():
            out = orc(inputs)
            hooked = set(orc.hooked.values())
            info = {
                "rules": sorted(set(orc.rules.values())),
                "dropped": sum(orc.dropped.values()),
                "unhooked": sorted(set(names) - hooked),
                "oracle_errors": orc.errors[:4],
            }
            return out, info

        return run

    return make


def run_family(
    family: str, builder: str, impls: list[str], inductor: bool, explain: bool = False
) -> dict[str, Any]:
    """All measurements of one family (one entry per experts implementation)."""
    out: dict[str, Any] = {}
    probe_impls = list(impls)
    for impl in probe_impls:
        entry: dict[str, Any] = {"family": family, "impl": impl, "kind": "transformers"}
        t0 = time.perf_counter()
        try:
            model = build_family(family, impl, builder)
            inputs = model_inputs(model, builder)
            with torch.no_grad():
                first_tensor(model(**inputs))
        except Exception as e:  # noqa: BLE001
            entry["build"] = {"ok": False, "error": _short(e)}
            out[impl] = entry
            if impl == probe_impls[0]:
                break  # the other implementations fail the same way
            continue
        sup = supported_impls(model)
        if impl not in sup:
            entry["build"] = {"ok": True}
            entry["unsupported"] = "no transformers experts module: the model as written only"
            out[impl] = entry
            continue
        n_params = sum(p.numel() for p in model.parameters())
        entry["build"] = {"ok": True, "params": n_params, "seconds": None}
        # a router may rank zero-computation experts beside E (LongCat-Flash: E + Z)
        zero = getattr(model.config, "zero_expert_num", None) or 0
        probe = RouterProbe({NUM_EXPERTS, NUM_EXPERTS + zero})
        with probe, torch.no_grad():
            model(**inputs)
        entry["router_topk"] = sum(1 for r in probe.topks if r["over"] == "experts")
        entry["topk_over_tokens"] = sum(1 for r in probe.topks if r["over"] == "tokens")
        entry["build"]["seconds"] = round(time.perf_counter() - t0, 1)
        # Each Dynamo trace costs 10-40 s on a loaded 2-core machine (the eager experts loop
        # breaks the graph ~10 times): explain itself runs with --explain; otherwise the passes'
        # own reports (the run_passes call explain makes, same graphs) stand for it.
        entry.update(
            check_model(
                model,
                inputs,
                oracle=hf_oracle(model, inputs),
                inductor=inductor,
                use_explain=explain or inductor,
            )
        )
        out[impl] = entry
        del model
    return out


# --------------------------------------------------------------------------------------------
# plain-PyTorch styles
# --------------------------------------------------------------------------------------------


def _styles_module():
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import moe_styles

    return moe_styles


def run_style(style: str, inductor: bool) -> dict[str, Any]:
    ms = _styles_module()
    entry: dict[str, Any] = {"family": style, "impl": "as written", "kind": "style"}
    try:
        module = ms.build(style)
        # a style written for one dtype keeps it (bse_grouped_mm: torch._grouped_mm takes
        # bf16 only); the others run in --dtype
        dtype = getattr(module, "dtype", None) if "dtype" in type(module).__dict__ else DTYPE
        module = module.to(dtype)
        x = ms.hidden(module).to(dtype)
        inputs = {"x": x}
    except Exception as e:  # noqa: BLE001
        entry["build"] = {"ok": False, "error": _short(e)}
        return {"as written": entry}
    entry["build"] = {"ok": True, "params": sum(p.numel() for p in module.parameters())}
    entry["own_capacity"] = bool(getattr(module, "own_capacity", False))

    def make(names, gamma):
        def run():
            out, dropped = ms.oracle(module, x, gamma, POLICY)
            return out, {"rules": [module.p_rule], "dropped": dropped, "unhooked": []}

        return run

    oracle = None if entry["own_capacity"] else make
    entry.update(
        check_model(module, inputs, oracle=oracle, inductor=inductor, use_explain=inductor)
    )
    if entry["own_capacity"] and entry.get("passes_matched"):
        entry["on"] = {"ok": False, "error": "a layer that enforces its own capacity was matched"}
    return {"as written": entry}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def status(e: dict[str, Any]) -> str:
    """One cell of the table."""
    b = e.get("build", {})
    if not b.get("ok"):
        return "build failed"
    if e.get("unsupported"):
        return "n/a"
    ex = e.get("explain", {})
    sites = ex.get("matched") or ex.get("left")
    if e.get("kind") == "transformers" and not e.get("router_topk") and not sites:
        if e.get("topk_over_tokens"):
            return "no token-choice top-k (expert choice?)"
        return "no router top-k at this config"
    if "error" in ex:
        return "explain failed"
    m = len(ex.get("matched", []))
    left = len(ex.get("left", []))
    return f"{m} matched" + (f", {left} left" if left else "")


def verdict(e: dict[str, Any]) -> str:
    off = e.get("off")
    if not off:
        return ""
    if off.get("ok") is None:
        return "compile failed"
    s = "ok" if off["ok"] else f"WRONG ({off['max_diff']:.3g})"
    on = e.get("on")
    if on:
        if on.get("ok") is None:
            s += "; on: " + on.get("error", "partial oracle")[:40]
        elif on["ok"]:
            s += "; on ok"
        else:
            s += f"; on WRONG ({on.get('max_diff', float('nan')):.3g})"
    return s


def _reasons(e: dict[str, Any]) -> list[str]:
    if not e.get("build", {}).get("ok"):
        return [e.get("build", {}).get("error", "")[:120]]
    out = []
    for r in e.get("explain", {}).get("left", []):
        out.append(f"{r['name']}: {r['reason']}")
    if "error" in e.get("explain", {}):
        out.append(e["explain"]["error"][:160])
    if e.get("off", {}).get("error"):
        out.append("compile: " + e["off"]["error"][:160])
    return out


def _reason_key(reason: str) -> str:
    """A refusal reason with graph-local names taken out, to group equal reasons."""
    import re

    reason = re.sub(r"\b[a-z_]+_\d+\b", "<node>", reason)
    return re.sub(r"\(shapes \[.*?\]\)", "(shapes ...)", reason)


def grouped_reasons(results: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """``{reason: ["family/impl", ...]}`` over every router site left as written, every build
    failure and every compile failure."""
    out: dict[str, list[str]] = {}
    for fam in sorted(results):
        for impl, e in results[fam].items():
            case = f"{fam}/{impl}"
            if not e.get("build", {}).get("ok"):
                out.setdefault("build: " + e.get("build", {}).get("error", "")[:90], []).append(
                    case
                )
                continue
            for r in e.get("explain", {}).get("left", []):
                cases = out.setdefault("left: " + _reason_key(r["reason"]), [])
                if case not in cases:
                    cases.append(case)
            if e.get("off", {}).get("error"):
                out.setdefault("compile: " + e["off"]["error"][:90], []).append(case)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    summ = summary(results)
    lines = [
        "# capmoe coverage",
        "",
        f"Generated by `python -m benchmarks.coverage` ({meta.get('date')}, git "
        f"{meta.get('rev') or meta.get('git')}, transformers {meta.get('transformers')}, "
        f"torch {meta.get('torch')}, mode: {meta.get('mode')}, load average at start "
        f"{meta.get('loadavg_start')}). Rule for what is an MoE family: the module docstring.",
        "",
        "Columns: *explain*: layers matched / router sites left as written (the passes' own "
        "reports from the compile, the `run_passes` call `explain` makes; `--explain` calls "
        "`capmoe_compile.explain` too); *check*: capacity off, compiled (capmoe passes) == "
        "eager; *on*: capacity on "
        f"(gamma {GAMMA}, `{POLICY}`), compiled == the eager `route()` oracle, for the matched "
        'layers; *graphs*: capmoe / `backend="eager"`.',
        "",
        "## Summary",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in summ.items()]
    lines += [
        "",
        "## Table",
        "",
        "| family / style | impl | explain | check | graphs | left / error | passes at |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam in sorted(results):
        for impl, e in results[fam].items():
            g = f"{e.get('capmoe_graphs', '-')}/{e.get('eager_graphs', '-')}"
            reasons = "; ".join(_reasons(e))[:300].replace("|", "/")
            rev = e.get("rev") or meta.get("rev") or meta.get("git") or ""
            lines.append(
                f"| {fam} | {impl} | {status(e)} | {verdict(e)} | {g} | {reasons} | {rev} |"
            )
    lines += ["", "## Reasons, grouped", ""]
    for reason, cases in grouped_reasons(results).items():
        lines.append(f"- **{reason.replace('|', '/')}** ({len(cases)}): {', '.join(cases)}")
    return "\n".join(lines) + "\n"


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    """The README's coverage table: one row per family or style, one column per experts
    implementation, each cell "matched" (layers), "left: <reason>", "n/a" or the build error."""
    lines = [
        "| family / style | grouped_mm | batched_mm | eager (as written) |",
        "|---|---|---|---|",
    ]

    def cell(e: dict[str, Any] | None) -> str:
        if e is None:
            return ""
        st = status(e)
        if st in ("build failed", "n/a"):
            return st if st == "n/a" else "build failed: " + _reasons(e)[0][:60]
        if "WRONG" in verdict(e):
            return "**" + verdict(e) + "**"
        left = e.get("explain", {}).get("left", [])
        reasons = sorted({_reason_key(r["reason"])[:150] for r in left})
        text = st if not reasons else f"{st}: " + "; ".join(reasons)
        if e.get("off", {}).get("error"):
            text += " (compile failed)"
        return text.replace("|", "/")

    for fam in sorted(results):
        r = results[fam]
        if any(e.get("kind") == "style" for e in r.values()):
            lines.append(f"| {fam} (style) |  |  | {cell(r.get('as written'))} |")
            continue
        if all(not e.get("build", {}).get("ok") for e in r.values()):
            continue  # listed under "build failed" in coverage.md
        lines.append(
            f"| {fam} | {cell(r.get('grouped_mm'))} | {cell(r.get('batched_mm'))} "
            f"| {cell(r.get('eager'))} |"
        )
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- coverage table: begin -->", "<!-- coverage table: end -->"


def write_readme_table(results: dict[str, dict[str, Any]], readme: Path) -> None:
    """Replace the README's generated table (between its two markers) with the results'."""
    text = readme.read_text()
    a, b = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:a] + "\n" + readme_table(results) + text[b:])


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    fams = {
        f: r for f, r in results.items() if any(e.get("kind") == "transformers" for e in r.values())
    }
    built = [f for f, r in fams.items() if any(e.get("build", {}).get("ok") for e in r.values())]
    moe = [f for f in built if any(e.get("router_topk") for e in fams[f].values())]

    def matched(impl, fully=False):
        return sorted(
            f
            for f in moe
            if impl in fams[f]
            and fams[f][impl].get("explain", {}).get("matched")
            and not (fully and fams[f][impl].get("explain", {}).get("left"))
        )

    wrong = [
        f"{f}/{i}"
        for f, r in results.items()
        for i, e in r.items()
        if (e.get("off") or {}).get("ok") is False or (e.get("on") or {}).get("ok") is False
    ]

    def matched_or_as_written(impl):
        # a family without switchable experts has one form, the model as written (its
        # 'eager' row): that row stands for every experts implementation
        return sorted(
            f
            for f in moe
            if f in matched(impl)
            or (
                fams[f].get(impl, {}).get("unsupported")
                and f in matched("eager")
                and not fams[f]["eager"].get("unsupported")
            )
        )

    def pct(n):
        return f"{n}/{len(moe)} ({100 * n / max(1, len(moe)):.0f}%)"

    def correctly_left(impl) -> list[str]:
        # issue 24's measure: a family left as written counts as correctly left when every site
        # it leaves says the layer enforces its own capacity (SPEC.md: it must stay as written)
        out = []
        for f in moe:
            e = fams[f].get(impl, {})
            left = e.get("explain", {}).get("left") or []
            if e.get("explain", {}).get("matched") or not left:
                continue
            if all("enforces its own capacity" in (r.get("reason") or "") for r in left):
                out.append(f)
        return sorted(out)

    def ran(impl) -> list[str]:
        return [f for f in moe if impl in fams[f] and not fams[f][impl].get("unsupported")]

    def bar(impl) -> str:
        n = len(ran(impl))
        ok = len(matched(impl)) + len(correctly_left(impl))
        return f"{ok}/{n} ({100 * ok / max(1, n):.1f}%)" if n else "not run"

    return {
        "families": len(fams),
        "built": len(built),
        "moe_at_tiny_config": len(moe),
        "matched_grouped_mm": len(matched("grouped_mm")),
        "matched_batched_mm": len(matched("batched_mm")),
        "matched_eager": len(matched("eager")),
        # the goal's measure: of the families that route at the tiny config, those matched
        # under this implementation (or as written where they have no other)
        "matched_grouped_mm_or_as_written": pct(len(matched_or_as_written("grouped_mm"))),
        "matched_eager_or_as_written": pct(len(matched_or_as_written("eager"))),
        "moe_not_matched_eager": sorted(
            f for f in moe if "eager" in fams[f] and f not in matched("eager")
        ),
        "all_sites_matched_grouped_mm": len(matched("grouped_mm", True)),
        "moe_not_matched_grouped_mm": sorted(
            f for f in moe if "grouped_mm" in fams[f] and f not in matched("grouped_mm")
        ),
        "batched_mm_run": sorted(f for f in moe if "batched_mm" in fams[f]),
        "not_run": sorted(f for f in fams if "?" in fams[f] and "timed out" not in str(fams[f])),
        "compile_failed": sorted(
            f"{f}/{i}"
            for f, r in results.items()
            for i, e in r.items()
            if e.get("off") and e["off"].get("ok") is None
        ),
        # per implementation, over the MoE families that ran under it: matched, or left as
        # written where SPEC.md says they must be (their own capacity)
        **{f"matched_or_correctly_left_{i}": bar(i) for i in IMPLS},
        **{f"correctly_left_{i}": correctly_left(i) for i in IMPLS if ran(i)},
        **{
            f"gaps_{i}": sorted(set(ran(i)) - set(matched(i)) - set(correctly_left(i)))
            for i in IMPLS
            if ran(i)
        },
        "own_capacity_styles_matched": sorted(
            f
            for f, r in results.items()
            for e in r.values()
            if e.get("own_capacity") and e.get("passes_matched")
        ),
        "wrong": wrong,
    }


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(with_isa(payload), f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


class _FamilyTimeout(BaseException):
    """Raised by SIGALRM in a worker; a BaseException, so no ``except Exception`` eats it."""


def _one(name: str, args) -> dict[str, Any]:
    if name.startswith("style:"):
        return run_style(name[6:], args.inductor)
    builder = _builder(name)
    impls = args.impl.split(",") if args.impl else list(IMPLS)
    if builder is None:
        err = "no text model for this config in the registry"
        return {
            impls[0]: {
                "family": name,
                "impl": impls[0],
                "kind": "transformers",
                "build": {"ok": False, "error": err},
            }
        }
    return run_family(name, builder, impls, args.inductor, args.explain)


def _worker(args) -> None:
    """Child process: families/styles in turn (one import of torch and transformers for all),
    one result line each, ``timeout`` seconds each (SIGALRM)."""
    import logging
    import signal

    torch.set_num_threads(args.threads)
    global DTYPE
    DTYPE = DTYPES[args.dtype]
    logging.getLogger("capmoe_compile").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()

    def alarm(signum, frame):
        raise _FamilyTimeout

    signal.signal(signal.SIGALRM, alarm)
    for name in args.worker.split(","):
        t0 = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            res = _one(name, args)
        except _FamilyTimeout:
            err = f"timed out after {args.timeout} s"
            res = {"?": {"family": name, "impl": "?", "build": {"ok": False, "error": err}}}
        except Exception as e:  # noqa: BLE001
            res = {"?": {"family": name, "impl": "?", "build": {"ok": False, "error": _short(e)}}}
        finally:
            signal.alarm(0)
        for e in res.values():
            e["wall_seconds"] = round(time.perf_counter() - t0, 1)
        torch._dynamo.reset()
        print("\n@@RESULT@@" + json.dumps({"name": name, "res": res}, default=str), flush=True)


def _snapshot(rev: str) -> Path:
    """The repository at ``rev`` (``git archive``), with this file and ``tests/moe_styles.py``
    from the working tree, in a temporary directory: workers run there, so the passes under
    test are ``rev``'s, whatever else changes in the working tree during the run."""
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="capmoe_coverage_"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    for rel in ("benchmarks/coverage.py", "tests/moe_styles.py"):
        (dest / rel).write_bytes((ROOT / rel).read_bytes())
    return dest


def _spawn(names: list[str], args) -> list[tuple[str, dict[str, Any]]]:
    """Run a chunk of families in one worker; a family without a result line (the worker
    died or hung past every alarm) is recorded as such."""
    cmd = [sys.executable, "-m", "benchmarks.coverage", "--worker", ",".join(names)]
    cmd += ["--threads", str(args.threads), "--timeout", str(args.timeout)]
    cmd += ["--dtype", args.dtype]
    if args.impl:
        cmd += ["--impl", args.impl]
    if args.inductor:
        cmd += ["--inductor"]
    if args.explain:
        cmd += ["--explain"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".inductor_cache"))
    stdout, err = "", ""
    try:
        p = subprocess.run(
            cmd,
            cwd=args.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout * len(names) + 120,
        )
        stdout, err = p.stdout, f"worker died (rc {p.returncode}): {(p.stderr or '')[-300:]}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = "worker hung past its timeouts"
    got: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            r = json.loads(line[len("@@RESULT@@") :])
            got[r["name"]] = r["res"]
    out = []
    for n in names:
        if n in got:
            out.append((n, got[n]))
        else:
            e = {"family": n, "impl": "?", "build": {"ok": False, "error": err.replace("\n", " ")}}
            out.append((n, {"?": e}))
            err = "not run: an earlier family of its worker died"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated model types (default: all)")
    ap.add_argument("--styles", help="comma-separated styles of tests/moe_styles.py (default all)")
    ap.add_argument("--no-styles", action="store_true")
    ap.add_argument("--styles-only", action="store_true")
    ap.add_argument("--impl", help="comma-separated experts implementations (default all three)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="models' dtype")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per family")
    ap.add_argument("--chunk", type=int, default=8, help="families per worker process")
    ap.add_argument("--inductor", action="store_true", help="compile with backend='capmoe'")
    ap.add_argument(
        "--explain",
        action="store_true",
        help="also call capmoe_compile.explain (one more trace per case; default: the passes' "
        "own reports from the compile stand for it)",
    )
    ap.add_argument("--resume", action="store_true", help="skip families already in the JSON")
    ap.add_argument("--list", action="store_true", help="print the MoE families and exit")
    ap.add_argument("--out", default=str(RESULTS / "coverage.json"))
    ap.add_argument(
        "--rev",
        help="run the passes of this git revision (a snapshot; default: the working tree)",
    )
    ap.add_argument(
        "--merge", nargs="+", help="merge these result JSON files into --out (and its .md)"
    )
    ap.add_argument(
        "--readme",
        action="store_true",
        help="write the coverage table of docs/coverage.md from --out's results and exit",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.readme:
        payload = _load(Path(args.out))
        write_readme_table(payload["results"], ROOT / "docs" / "coverage.md")
        Path(args.out).with_suffix(".md").write_text(
            markdown(payload["results"], payload.get("meta", {}))
        )
        print(json.dumps(summary(payload["results"]), indent=1))
        return
    if args.merge:
        merged: dict[str, Any] = {"results": {}, "meta": {}, "runs": []}
        for path in args.merge:
            part = _load(Path(path))
            merged["runs"].append(part.get("meta", {}))
            merged["families"] = part.get("families", merged.get("families"))
            rev = part.get("meta", {}).get("rev") or part.get("meta", {}).get("git")
            for fam, res in part.get("results", {}).items():
                for e in res.values():
                    e.setdefault("rev", rev)
                merged["results"].setdefault(fam, {}).update(res)
        merged["meta"] = dict(merged["runs"][-1])
        revs = sorted({r.get("rev") or r.get("git") or "?" for r in merged["runs"]})
        if len(revs) > 1:
            merged["meta"]["rev"] = "rows from " + ", ".join(revs) + " (column 'passes at')"
        merged["summary"] = summary(merged["results"])
        _save(Path(args.out), merged)
        Path(args.out).with_suffix(".md").write_text(markdown(merged["results"], merged["meta"]))
        print(json.dumps(merged["summary"], indent=1))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    fams = moe_families()
    if args.list:
        for name, info in fams.items():
            print(name, info)
        print(len(fams), "families")
        return
    names: list[str] = []
    if not args.styles_only:
        names += args.families.split(",") if args.families else list(fams)
    if not args.no_styles and not args.families:
        styles = _styles_module().STYLES
        names += ["style:" + s for s in (args.styles.split(",") if args.styles else styles)]
    out = Path(args.out)
    payload = _load(out)
    results = payload.get("results", {})
    if args.resume:
        names = [n for n in names if n.removeprefix("style:") not in results]
    from benchmarks.common import loadavg_end, machine

    meta = machine()
    args.cwd = ROOT
    if args.rev:
        args.cwd = _snapshot(args.rev)
        meta["rev"] = subprocess.run(
            ["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    with contextlib.suppress(Exception):
        meta["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "capmoe_compile"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        meta["capmoe_compile_uncommitted"] = dirty.splitlines()
    meta["dtype"] = args.dtype
    meta["mode"] = (
        "backend=capmoe (Inductor)" if args.inductor else "capmoe passes, graphs run as FX"
    )
    print(f"{len(names)} to run, {args.jobs} jobs, load {os.getloadavg()}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    chunks = [names[i : i + args.chunk] for i in range(0, len(names), args.chunk)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = (r for chunk in pool.map(lambda c: _spawn(c, args), chunks) for r in chunk)
        for name, res in done:
            key = name.removeprefix("style:")
            results.setdefault(key, {})
            results[key].update(res)
            results[key].pop("?", None) if len(res) > 1 or "?" not in res else None
            for impl, e in res.items():
                print(
                    f"{key:<28} {impl:<11} {status(e):<34} {verdict(e):<30} "
                    f"graphs {e.get('capmoe_graphs', '-')}/{e.get('eager_graphs', '-')}  "
                    f"{'; '.join(_reasons(e))[:140]}",
                    flush=True,
                )
            payload = {
                "meta": loadavg_end(meta),
                "families": fams,
                "results": results,
            }
            payload["summary"] = summary(results)
            _save(out, payload)
            out.with_suffix(".md").write_text(markdown(results, meta))
    print(json.dumps(payload.get("summary", {}), indent=1))


if __name__ == "__main__":
    main()
