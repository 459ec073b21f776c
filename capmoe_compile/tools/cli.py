"""The ``capmoe`` command line: ``capmoe demo`` and friends."""

from __future__ import annotations

import argparse
import math
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    import capmoe_compile as cc
    from capmoe_compile.testing import zoo

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.model == "shipped":
        from capmoe_compile.models import load_tiny_moe, stdlib_corpus, validation_windows

        print(
            "capmoe demo: the shipped tiny MoE LM (Mixtral config, E=8, k=2, trained without a "
            "balancing loss) on held-out Python standard library text, "
            f"batch {args.batch} x {args.seq} bytes, gamma={args.gamma}, policy={args.policy}"
        )
        model, _ = load_tiny_moe()
        ids = validation_windows(stdlib_corpus(), args.seq, args.batch)
    else:
        print(
            f"capmoe demo: tiny {args.family} (random weights, router skewed like trained "
            f"ones), batch {args.batch} x {args.seq} tokens, gamma={args.gamma}, "
            f"policy={args.policy}"
        )
        model = zoo.build(args.family, seed=args.seed, skew=args.skew)
        ids = zoo.random_input_ids(model, args.batch, args.seq, seed=args.seed)

    # one forward over whole windows: no KV cache wanted (the shipped config enables it for
    # generate)
    call = {"use_cache": False}
    report = cc.explain(model, capacity_factor=args.gamma, policy=args.policy)(ids, **call)
    print(report)

    compiled = torch.compile(model, backend="capmoe", dynamic=False)
    with torch.no_grad():
        eager = model(ids, **call).logits
        with cc.config.patch(capacity_factor=None):
            off = compiled(ids, **call).logits
        err = (off - eager).abs().max().item()
        agree = torch.allclose(off, eager, atol=1e-4, rtol=1e-4)
        with cc.config.patch(capacity_factor=args.gamma, policy=args.policy):
            with cc.record_stats() as stats:
                on = compiled(ids, **call).logits
    print(f"\ncapacity off: compiled == eager: {agree} (max |diff| {err:.2e})")
    loss_off, loss_on = _next_token_loss(off, ids), _next_token_loss(on, ids)
    text = "held-out text" if args.model == "shipped" else "random tokens, random weights"
    print(
        f"\nthe cost: next-token loss on the {text}: off {loss_off:.4f} "
        f"(perplexity {math.exp(loss_off):.3f}), gamma={args.gamma} {args.policy} "
        f"{loss_on:.4f} (perplexity {math.exp(loss_on):.3f}, "
        f"{math.exp(loss_on - loss_off) - 1:+.1%})"
    )
    print(f"\ngamma={args.gamma}, policy={args.policy}, per layer:")
    head = f"{'layer':<22} {'T':>5} {'C':>5} {'max/mean before':>16} {'after':>6} {'dropped':>8} {'added':>6} {'EP speedup':>11}"
    print(head)
    for s in stats.layers:
        print(
            f"{s.name:<22} {s.tokens:>5} {s.capacity if s.capacity is not None else '-':>5} "
            f"{s.imbalance_before:>16.2f} {s.imbalance_after:>6.2f} {s.dropped:>8} {s.added:>6} "
            f"{s.modeled_speedup:>10.2f}x"
        )
    print(
        "\nbefore / after: max/mean expert load of the pairs the model selected / of the pairs "
        "computed under capacity (the busiest expert's share, 1.00 = perfectly balanced)"
    )
    print(
        "EP speedup: max_load_before / max_load_after, how much sooner the busiest expert "
        "(which sets the layer's time under expert parallelism) finishes, modeled at equal "
        "per-token cost, not measured"
    )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if agree else 1


def _next_token_loss(logits, ids) -> float:
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    ).item()


def _report(args: argparse.Namespace) -> int:
    from capmoe_compile.tools.report import write_report

    for name, (path, _) in write_report(args.results, args.out_dir, gamma=args.gamma).items():
        print(f"{name}: {path}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    import capmoe_compile as cc
    from capmoe_compile.models import (
        load_balanced_moe,
        load_tiny_moe,
        split_validation,
        stdlib_corpus,
        validation_windows,
    )

    torch.set_num_threads(args.threads)
    loaders = {"tiny": load_tiny_moe, "balanced": load_balanced_moe}
    model = loaders[args.model]()[0] if args.model in loaders else load_tiny_moe(args.model)[0]
    cal_part, held_part = split_validation(stdlib_corpus())

    def batches(part, n):
        w = validation_windows(part, args.seq, n - n % args.batch)
        return [w[i : i + args.batch] for i in range(0, w.shape[0], args.batch)]

    compiled = torch.compile(model, backend="capmoe", dynamic=False)
    cal = cc.calibrate(
        model,
        batches(cal_part, args.windows),
        target=args.target,
        max_ppl_increase=args.max_ppl_increase,
        policies=tuple(args.policies.split(",")),
        compiled=compiled,
        progress=args.verbose,
    )
    print(cal)
    print(
        f"search: {cal.search['forward_passes']} forward passes of {len(cal.search['rounds'])} "
        f"check round(s), {cal.search['seconds']:.1f} s"
    )
    if args.held_out:
        res = cal.evaluate(model, batches(held_part, args.held_out), compiled=compiled)
        print(
            f"held out ({args.held_out} windows of other files): perplexity "
            f"{res['ppl_change']:+.2%}, modeled EP speedup {res['speedup']:.3f}x"
        )
    if args.out:
        print(f"wrote {cal.save(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capmoe",
        description="capmoe-compile: capacity-aware MoE inference as a torch.compile backend",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a tiny skewed MoE model eager and compiled")
    demo.add_argument("--family", default="mixtral", help="zoo family (with --model zoo)")
    demo.add_argument("--gamma", type=float, default=1.0, help="capacity factor")
    demo.add_argument("--policy", default="score")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--seq", type=int, default=64)
    demo.add_argument("--skew", type=float, default=1.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--model",
        choices=("shipped", "zoo"),
        default="shipped",
        help="shipped: the trained tiny MoE LM (real skew); zoo: a random-weight --family model",
    )
    demo.set_defaults(func=_demo)
    report = sub.add_parser(
        "report", help="PNG plots of a quality sweep (benchmarks/quality.py's JSON)"
    )
    report.add_argument(
        "--results", required=True, help="a quality sweep's JSON (benchmarks/quality.py)"
    )
    report.add_argument("--out-dir", default=".", help="where the PNGs go (default: here)")
    report.add_argument("--gamma", type=float, default=1.0, help="gamma of the load profiles")
    report.set_defaults(func=_report)
    cal = sub.add_parser(
        "calibrate",
        help="per-layer capacity factors for a target modeled EP speedup (capmoe_compile.calibrate)",
    )
    cal.add_argument("--model", default="balanced", help="tiny, balanced, or a model directory")
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target", type=float, help="modeled EP speedup to reach, e.g. 1.3")
    goal.add_argument("--max-ppl-increase", type=float, help="perplexity budget, e.g. 0.01")
    cal.add_argument("--policies", default="score", help="comma-separated policies to search")
    cal.add_argument("--windows", type=int, default=32, help="calibration windows")
    cal.add_argument("--held-out", type=int, default=256, help="held-out windows (0: none)")
    cal.add_argument("--batch", type=int, default=8)
    cal.add_argument("--seq", type=int, default=256)
    cal.add_argument("--threads", type=int, default=1)
    cal.add_argument("--out", help="save the calibration JSON here")
    cal.add_argument("-v", "--verbose", action="store_true", help="print every search pass")
    cal.set_defaults(func=_calibrate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
