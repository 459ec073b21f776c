"""``capmoe plan``: per-layer expert copies, ranks and capacity from recorded loads."""

from __future__ import annotations

from pathlib import Path

from capmoe_compile.plan import load_loads, plan
from capmoe_compile.replicas import Placement
from capmoe_compile.tools.cli_common import UsageError


def add_cli(sub) -> None:
    """Add ``plan`` to the ``capmoe`` subcommands (``sub``: argparse subparsers)."""
    p = sub.add_parser(
        "plan",
        help="per-layer expert copies, ranks and capacity from record_stats loads",
        description="Plan redundant expert copies and capacity per copy from loads recorded "
        "by record_stats (capmoe_compile.plan.save_loads writes the LOADS file).",
    )
    p.add_argument("loads", metavar="LOADS", help="a capmoe-loads JSON (plan.save_loads)")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks")
    p.add_argument("--spare", type=int, default=1, help="spare slots per rank (default: 1)")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--gamma", type=float, help="capacity factor per copy, every layer")
    cap.add_argument("--max-drop", type=float, help="per layer: smallest gamma dropping <= this")
    p.add_argument("--no-replicas", action="store_true", help="capacity alone (no copies)")
    p.add_argument("--out", required=True, help="where the plan JSON goes")
    p.set_defaults(func=_cli)


def _cli(args, progress=None) -> int:
    # bad input ends as every command's does (cli.main): capmoe: error: ..., exit code 2
    if args.ranks < 1 or args.spare < 0:
        raise UsageError("--ranks must be >= 1 and --spare >= 0")
    for v, flag in ((args.gamma, "--gamma"), (args.max_drop, "--max-drop")):
        if v is not None and v <= 0:
            raise UsageError(f"{flag} must be > 0")
    path = Path(args.loads)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"LOADS {args.loads} {what}: give the JSON plan.save_loads wrote")
    try:
        loads = load_loads(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot read {args.loads}: {e}") from None
    p = plan(
        loads,
        args.ranks,
        args.spare,
        gamma=args.gamma,
        max_drop=args.max_drop,
        replicas=not args.no_replicas,
    )
    p.save(args.out)
    for name, layer in p.layers.items():
        m, pl = layer["modeled"], Placement.from_dict(layer["placement"])
        print(
            f"{name}: {pl.num_copies} copies (R={pl.redundant}) on {args.ranks} ranks, "
            f"gamma={layer['capacity_factor']}, modeled speedup {m['speedup']:.3f}, "
            f"dropped {m['dropped_share']:.2%}"
        )
    print(f"modeled speedup {p.record['modeled_speedup']:.3f}; plan written to {args.out}")
    return 0
