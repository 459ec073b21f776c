"""``capmoe demo``: a tiny skewed MoE model run eager, explained and compiled."""

from __future__ import annotations

import argparse
import math
import time

from capmoe_compile.tools.cli_common import (
    UsageError,
    _did_you_mean,
    _load_model,
    _missing,
)
from capmoe_compile.tools.progress import Progress


def _demo(args: argparse.Namespace, progress: Progress) -> int:
    echo = progress.echo
    if args.model == "zoo":
        try:
            from capmoe_compile.testing import zoo
        except ModuleNotFoundError as e:
            raise _missing("models", "capmoe demo --model zoo", e) from e
        if args.family not in zoo.FAMILIES:
            raise UsageError(
                f"--family {args.family!r} is not a zoo family"
                f"{_did_you_mean(args.family, zoo.FAMILIES)} "
                f"(choose from {', '.join(zoo.FAMILIES)})"
            )
    import torch

    import capmoe_compile as cc

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.model == "shipped":
        from capmoe_compile.models import stdlib_corpus, validation_windows

        echo(
            "capmoe demo: the shipped tiny MoE LM (Mixtral config, E=8, k=2, trained without a "
            "balancing loss) on held-out Python standard library text, "
            f"batch {args.batch} x {args.seq} bytes, gamma={args.gamma}, policy={args.policy}"
        )
        progress.phase("loading the shipped model and its held-out text")
        model = _load_model("tiny")
        ids = validation_windows(stdlib_corpus(), args.seq, args.batch)
    else:
        echo(
            f"capmoe demo: tiny {args.family} (random weights, router skewed like trained "
            f"ones), batch {args.batch} x {args.seq} tokens, gamma={args.gamma}, "
            f"policy={args.policy}"
        )
        progress.phase(f"building a random-weight {args.family}")
        model = zoo.build(args.family, seed=args.seed, skew=args.skew)
        ids = zoo.random_input_ids(model, args.batch, args.seq, seed=args.seed)

    # one forward over whole windows: no KV cache wanted (the shipped config enables it for
    # generate)
    call = {"use_cache": False}
    progress.phase("explain: tracing the model with the capmoe passes")
    report = cc.explain(model, capacity_factor=args.gamma, policy=args.policy)(ids, **call)
    echo(report)

    compiled = torch.compile(model, backend="capmoe", dynamic=False)
    with torch.no_grad():
        progress.phase("eager run")
        eager = model(ids, **call).logits
        progress.phase("compile (Inductor) and the capacity-off run")
        with cc.config.patch(capacity_factor=None):
            off = compiled(ids, **call).logits
        err = (off - eager).abs().max().item()
        agree = torch.allclose(off, eager, atol=1e-4, rtol=1e-4)
        progress.phase(f"capacity-on run (gamma={args.gamma}, policy={args.policy})")
        with cc.config.patch(capacity_factor=args.gamma, policy=args.policy):
            with cc.record_stats() as stats:
                on = compiled(ids, **call).logits
    echo(f"\ncapacity off: compiled == eager: {agree} (max |diff| {err:.2e})")
    loss_off, loss_on = _next_token_loss(off, ids), _next_token_loss(on, ids)
    text = "held-out text" if args.model == "shipped" else "random tokens, random weights"
    echo(
        f"\nthe cost: next-token loss on the {text}: off {loss_off:.4f} "
        f"(perplexity {math.exp(loss_off):.3f}), gamma={args.gamma} {args.policy} "
        f"{loss_on:.4f} (perplexity {math.exp(loss_on):.3f}, "
        f"{math.exp(loss_on - loss_off) - 1:+.1%})"
    )
    echo(f"\ngamma={args.gamma}, policy={args.policy}, per layer:")
    head = f"{'layer':<22} {'T':>5} {'C':>5} {'max/mean before':>16} {'after':>6} {'dropped':>8} {'added':>6} {'EP speedup':>11}"
    echo(head)
    for s in stats.layers:
        echo(
            f"{s.name:<22} {s.tokens:>5} {s.capacity if s.capacity is not None else '-':>5} "
            f"{s.imbalance_before:>16.2f} {s.imbalance_after:>6.2f} {s.dropped:>8} {s.added:>6} "
            f"{s.modeled_speedup:>10.2f}x"
        )
    echo(
        "\nbefore / after: max/mean expert load of the pairs the model selected / of the pairs "
        "computed under capacity (the busiest expert's share, 1.00 = perfectly balanced)"
    )
    echo(
        "EP speedup: max_load_before / max_load_after, how much sooner the busiest expert "
        "(which sets the layer's time under expert parallelism) finishes, modeled at equal "
        "per-token cost, not measured"
    )
    echo(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if agree else 1


def _next_token_loss(logits, ids) -> float:
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    ).item()
