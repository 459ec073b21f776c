"""The ``transformers`` MoE families :func:`capmoe_compile.testing.zoo.build` makes tiny: one
config recipe per family (hand-written for the main and core families, one generic recipe for
the others), by the names the tests and benchmarks walk."""

from __future__ import annotations

from collections.abc import Callable


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
