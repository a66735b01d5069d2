"""`spd params`: the per-component parameter table beside the research plan's numbers."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("params", help="per-component parameter table beside the research plan's numbers")
    p.add_argument("--preset", default="v15", help="model preset: v15, v14 or v15-tiny (default: v15)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spd.models.build import build_model
    from spd.models.params import format_table, parameter_table

    column = "v14" if args.preset.replace("_", "-") == "v14" else "v15"  # the plan's column to compare with
    table = parameter_table(build_model(args.preset, warn_random_encoder=False), column)
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0
