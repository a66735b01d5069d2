"""The `spd` command line. Each sub-command lives in a small `_cmd_*` function."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_params(args: argparse.Namespace) -> int:
    from spd.build import build_model
    from spd.params import format_table, parameter_table

    table = parameter_table(build_model(args.preset, warn_random_encoder=False))
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd",
        description="SPD: metric depth at the K pixels you ask for (encode the image once, decode only the queries).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="per-component parameter table beside the research plan's numbers")
    p.add_argument("--preset", default="v15", help="model preset: v15 or v15-tiny (default: v15)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
