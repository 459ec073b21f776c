"""Train the balanced MoE LM shipped in ``capmoe_compile/models/balanced_moe/``.

    python -m benchmarks.train_balanced_moe --seed 0 [--steps 1500] [--out DIR]

The "realistic" second model: routed the way deployed MoE families are trained to route.

- Family: ``Qwen2MoeForCausalLM`` (Qwen1.5-MoE style): softmax router, top-k without
  renormalisation, plus an always-on gated shared expert (never routed, never dropped).
- Fine-grained routing: 32 routed experts, top-4 (OLMoE / Qwen-MoE style), expert FFN 64,
  shared expert FFN 128; hidden 128, 4 layers, 4 heads / 2 KV heads, tied embeddings
  (3.6 M parameters, about 7.2 MB in fp16).
- **Switch-style load-balancing auxiliary loss, per layer**: ``coef * sum_l E * sum_e f_le P_le``
  with ``f_le`` the share of layer ``l``'s ``T * k`` assignments that go to expert ``e`` and
  ``P_le`` its mean router probability (1.0 per layer when balanced), coefficient 0.01 as in
  Switch / OLMoE. Computed here from the router logits rather than by transformers'
  ``load_balancing_loss_func``, which pools all layers' assignments into one histogram (so
  layers skewed in opposite directions cancel) instead of balancing each layer.

Same corpus, tokenizer, optimiser, schedule and helpers as ``benchmarks/train_tiny_moe.py``
(which ships the skewed model trained without the balancing term): the Python standard
library's top-level modules, byte-level ids, one file in ten held out.

Deterministic for a seed on one machine (one CPU thread, seeded init and batch sampler, a fixed
step count). Records the corpus version, the final validation loss on the fp16 weights that
ship, the per-layer max/mean expert load on held-out text and the training history in
``training.json``; the printed log is kept beside it as ``train_log.txt`` by the command in
``capmoe_compile/models/balanced_moe/README.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.train_tiny_moe import evaluate, layer_skew, lr_at, save
from capmoe_compile.models import (
    BALANCED_MOE_DIR,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    stdlib_corpus,
    validation_windows,
)

AUX_LOSS = 0.01

MODEL_KWARGS = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 128,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "router_aux_loss_coef": AUX_LOSS,
    "output_router_logits": False,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "use_cache": False,
}


def build_model(seed: int, aux_loss: float = AUX_LOSS):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(MODEL_KWARGS)
    kwargs.update(router_aux_loss_coef=aux_loss, output_router_logits=bool(aux_loss))
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs))
    model.set_experts_implementation("grouped_mm")
    return model


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Sum over layers of the Switch balancing term ``E * sum_e f_e * P_e`` (1 when balanced)."""
    total = router_logits[0].new_zeros(())
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts = torch.zeros(num_experts).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel())
        )
        f = counts / chosen.numel()
        total = total + num_experts * (f * probs.mean(0)).sum()
    return total


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = stdlib_corpus()
    v = corpus.version
    print(
        f"corpus: Python {v['python']} stdlib {v['files']} files ({len(v['val_files'])} held out), "
        f"{v['train_tokens']:,} train / {v['val_tokens']:,} val bytes, sha256 {v['sha256'][:16]}"
    )
    val = validation_windows(corpus, args.seq, args.val_windows)
    model = build_model(args.seed, args.aux_loss)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Qwen2-MoE config (E=32, k=4, shared expert), {params:,} parameters, "
        f"seed {args.seed}, aux loss {args.aux_loss}"
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_start = corpus.train.numel() - args.seq
    history = []
    window_loss, window_aux, window_t = 0.0, 0.0, time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, n_start, (args.batch,), generator=gen)
        x = torch.stack([corpus.train[s : s + args.seq] for s in starts.tolist()])
        out = model(x)
        logits = out.logits[:, :-1].float()
        lm = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        aux = (
            balance_loss(out.router_logits, MODEL_KWARGS["num_experts_per_tok"])
            if args.aux_loss
            else lm.new_zeros(())
        )
        (lm + args.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss += lm.item()
        window_aux += aux.item() / MODEL_KWARGS["num_hidden_layers"]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            dt = time.perf_counter() - window_t
            model.config.output_router_logits = False
            val_loss = evaluate(model, val[: args.val_windows // 4])
            skew = [s["max_over_mean"] for s in layer_skew(model, val[:16])]
            model.config.output_router_logits = bool(args.aux_loss)
            elapsed = time.perf_counter() - t0
            print(
                f"step {step + 1:>5}/{args.steps}  train {window_loss / n:.3f}  "
                f"aux {window_aux / n:.3f}  val~ {val_loss:.3f}  max/mean {skew}  "
                f"{n * args.batch * args.seq / dt:,.0f} tok/s  {elapsed:.0f} s",
                flush=True,
            )
            history.append(
                {
                    "step": step + 1,
                    "train_loss": window_loss / n,
                    "aux_loss": window_aux / n,
                    "val_loss_subset": val_loss,
                }
            )
            window_loss, window_aux, window_t = 0.0, 0.0, time.perf_counter()

    # what ships is fp16 and routes without the aux-loss outputs: final figures on those weights
    model.config.output_router_logits = False
    model = model.to(torch.float16).to(torch.float32)
    model.eval()
    val_loss = evaluate(model, val)
    skew = layer_skew(model, val)
    wall = time.perf_counter() - t0
    config = {k: v for k, v in MODEL_KWARGS.items() if k != "rope_parameters"}
    config["router_aux_loss_coef"] = args.aux_loss
    record = {
        "model": "balanced_moe",
        "architecture": "Qwen2MoeForCausalLM",
        "config": config,
        "parameters": params,
        "stored_dtype": "float16",
        "tokenizer": "byte-level (ByT5Tokenizer, extra_ids=0): id = byte + 3",
        "corpus": corpus.version,
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "warmup": args.warmup,
        "threads": args.threads,
        "aux_loss": args.aux_loss,
        "aux_loss_form": "per layer: coef * sum_l E * sum_e f_le * P_le (Switch), top-k counts",
        "torch": torch.__version__,
        "train_seconds": round(wall, 1),
        "final_val_loss": round(val_loss, 4),
        "final_val_bits_per_byte": round(val_loss / math.log(2), 4),
        "val_tokens": int(val[:, 1:].numel()),
        "expert_load": skew,
        "history": history,
    }
    print(f"\nfinal validation loss {val_loss:.4f} nats/byte ({val_loss / math.log(2):.3f} bits)")
    print("per-layer expert load (model's own top-4 on the validation windows):")
    for s in skew:
        print(f"  {s['layer']:<32} max/mean {s['max_over_mean']:.2f}")
    save(model, record, Path(args.out))
    print(f"wrote {args.out} ({wall:.0f} s)")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aux-loss", type=float, default=AUX_LOSS, help="load-balancing coefficient")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=str(BALANCED_MOE_DIR))
    train(p.parse_args())


if __name__ == "__main__":
    main()
