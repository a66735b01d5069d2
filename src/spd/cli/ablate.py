"""`spd ablate`: train, evaluate and time the plan's ablation variants in one command (DESIGN.md §11)."""

from __future__ import annotations

import argparse

from spd.cli.args import positive_int


def add_parser(subparsers) -> None:
    from spd.experiments.ablation import VARIANTS

    p = subparsers.add_parser(
        "ablate", help="the plan's ablation table: train, evaluate and time each variant, one command",
        description="Each variant trains as its own resumable run folder OUT/runs/<variant> (a finished one is skipped), "
                    "is evaluated with the sparse protocol on the test split, and all are timed in one process; "
                    "writes OUT/ablation.md, ablation.json and ablation.png.",
    )
    p.add_argument("--config", required=True, help="training config of every variant: bundled name or YAML path")
    p.add_argument("--data-root", required=True, help="dataset, as for `spd train` (its test split is evaluated)")
    p.add_argument("--out", required=True, help="study folder: runs/<variant>/, evals/, ablation.{md,json,png}")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help=f"which variants (default all): {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimiser steps of every variant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the config for every variant, as for `spd train`")
    p.add_argument("--repeat", type=positive_int, default=9, help="timing rounds (default 9)")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `spd train` command per variant (for a cluster; prefix torchrun for DDP) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.errors import EXIT_PREEMPTED, DataLayoutError
    from spd.experiments.ablation import resolve_variants, run_ablation, train_command, variant_config

    variants = resolve_variants(args.variants)
    for variant in variants:  # every variant's config is checked before anything trains
        variant_config(args.config, args.set, variant, args.max_steps)
    if args.print_commands:
        for variant in variants:
            print(train_command(args.config, args.data_root, Path(args.out) / "runs" / variant.name, args.set, variant,
                                args.max_steps))
        return 0
    if not Path(args.data_root).exists():
        raise DataLayoutError(f"--data-root {args.data_root}: not found")
    result = run_ablation(args.config, args.data_root, args.out, variants, args.set, args.max_steps, args.repeat)
    if result.get("stopped") == "preempted":
        print(f"interrupted while training {result['variant']} (saved); run the same command again to continue")
        return EXIT_PREEMPTED
    print(f"{len(result['rows'])} rows: {args.out}/ablation.md, ablation.json, ablation.png")
    return 0
