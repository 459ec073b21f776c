"""Train the tiny MoE LM shipped in ``capmoe_compile/models/tiny_moe/``.

    python -m benchmarks.train_tiny_moe --seed 0 [--steps 1200] [--out DIR]

A Mixtral-config causal LM (hidden 128, 4 layers, 8 experts, top-2, expert FFN 128, 4 heads
with 2 KV heads, tied embeddings: 1.8 M parameters, 3.6 MB in fp16), byte-level (ids = byte + 3,
ByT5's scheme), trained on the top-level modules of the Python standard library of the running
interpreter (PSF license; ``capmoe_compile.models.stdlib_corpus``; one file in ten held out).

No auxiliary load-balancing loss (``router_aux_loss_coef=0``, ``output_router_logits=False``):
routing is free to become as skewed as it likes, which is what trained MoE models without a
strong balancing term do and what capacity-aware inference is for.

Deterministic for a seed on one machine: one CPU thread (on a shared 2-core machine two threads
were 5-10x slower, not faster), seeded init and a seeded batch sampler, a fixed step count.
Prints progress, then records the corpus version, the final validation loss (measured on the
fp16 weights that are shipped) and per-layer max/mean expert load in ``training.json`` beside
the safetensors, config and tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import with_isa
from capmoe_compile.models import (
    EOS_ID,
    PAD_ID,
    TINY_MOE_DIR,
    VOCAB_SIZE,
    stdlib_corpus,
    validation_windows,
)
from capmoe_compile.testing import zoo

MODEL_KWARGS = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "router_aux_loss_coef": 0.0,
    "output_router_logits": False,
    "router_jitter_noise": 0.0,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "use_cache": False,
}


def build_model(seed: int, aux_loss: float = 0.0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(MODEL_KWARGS)
    if aux_loss:
        kwargs.update(router_aux_loss_coef=aux_loss, output_router_logits=True)
    model = MixtralForCausalLM(MixtralConfig(**kwargs))
    model.set_experts_implementation("grouped_mm")
    return model


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats per byte) over ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def layer_skew(model, windows: torch.Tensor) -> list[dict]:
    """Per MoE layer: expert loads of the model's own top-k on ``windows`` and max/mean."""
    model.eval()
    loads = zoo.expert_loads(model, windows)
    model.train()
    return [
        {
            "layer": name,
            "loads": counts.tolist(),
            "max_over_mean": round(zoo.load_ratio(counts), 3),
        }
        for name, counts in loads.items()
    ]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    print(f"model: Mixtral config, {params:,} parameters, seed {args.seed}")

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
    window_loss, window_t = 0.0, time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, n_start, (args.batch,), generator=gen)
        x = torch.stack([corpus.train[s : s + args.seq] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            dt = time.perf_counter() - window_t
            val_loss = evaluate(model, val[: args.val_windows // 4])
            skew = [s["max_over_mean"] for s in layer_skew(model, val[:16])]
            elapsed = time.perf_counter() - t0
            print(
                f"step {step + 1:>5}/{args.steps}  train {window_loss / n:.3f}  "
                f"val~ {val_loss:.3f}  max/mean {skew}  "
                f"{n * args.batch * args.seq / dt:,.0f} tok/s  {elapsed:.0f} s",
                flush=True,
            )
            history.append(
                {"step": step + 1, "train_loss": window_loss / n, "val_loss_subset": val_loss}
            )
            window_loss, window_t = 0.0, time.perf_counter()

    # what ships is fp16 and routes without the aux-loss outputs: measure the final figures on
    # the rounded weights
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = 0.0 if not args.aux_loss else args.aux_loss
    model = model.to(torch.float16).to(torch.float32)
    model.eval()
    val_loss = evaluate(model, val)
    skew = layer_skew(model, val)
    wall = time.perf_counter() - t0
    record = {
        "model": "tiny_moe",
        "architecture": "MixtralForCausalLM",
        "config": {k: v for k, v in MODEL_KWARGS.items() if k != "rope_parameters"},
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
        "torch": torch.__version__,
        "train_seconds": round(wall, 1),
        "final_val_loss": round(val_loss, 4),
        "final_val_bits_per_byte": round(val_loss / math.log(2), 4),
        "val_tokens": int(val[:, 1:].numel()),
        "expert_load": skew,
        "history": history,
    }
    print(f"\nfinal validation loss {val_loss:.4f} nats/byte ({val_loss / math.log(2):.3f} bits)")
    print("per-layer expert load (model's own top-2 on the validation windows):")
    for s in skew:
        print(f"  {s['layer']:<32} max/mean {s['max_over_mean']:.2f}  loads {s['loads']}")
    save(model, record, Path(args.out))
    print(f"wrote {args.out} ({wall:.0f} s)")
    return record


def save(model, record: dict, out: Path) -> None:
    from transformers import ByT5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    # trained without a KV cache; the shipped files are for inference, where generate needs it
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tok = ByT5Tokenizer(extra_ids=0)
    tok.model_max_length = MODEL_KWARGS["max_position_embeddings"]
    tok.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(with_isa(record), indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--aux-loss",
        type=float,
        default=0.0,
        help="load-balancing loss coefficient (default 0: none, routing free to skew)",
    )
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=str(TINY_MOE_DIR))
    train(p.parse_args())


if __name__ == "__main__":
    main()
