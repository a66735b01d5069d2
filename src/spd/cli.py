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


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x640 (HxW), got {text!r}") from None
    return height, width


def _cmd_synth(args: argparse.Namespace) -> int:
    from spd.data.synthetic import generate

    out = generate(args.out, args.n_train, args.n_test, args.size, args.holes, args.seed, args.workers)
    print(f"wrote {args.n_train} train + {args.n_test} test frames to {out} "
          f"(lists: {out / 'train_files.txt'}, {out / 'test_files.txt'})")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from spd.data.check import check_dataset

    report = check_dataset(args.root, args.filelist, args.min_depth, args.max_depth)
    print(report.summary())
    return 0 if report.ok else 1


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

    p = sub.add_parser("synth", help="write a synthetic NYU-layout dataset (procedural rooms, exact depth)")
    p.add_argument("--out", required=True, help="output folder (sync/, official_splits/test/, *_files.txt)")
    p.add_argument("--n-train", type=int, required=True, help="training frames")
    p.add_argument("--n-test", type=int, required=True, help="test frames")
    p.add_argument("--size", type=_parse_size, default=(480, 640), help="HxW (default 480x640, NYU's size)")
    p.add_argument("--holes", action="store_true", help="add Kinect-like holes (depth 0) to the depth maps")
    p.add_argument("--seed", type=int, default=0, help="frame i depends only on (seed, split, i)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("check", help="validate every file of a split list and print a summary")
    p.add_argument("--root", required=True, help="folder the list's paths are relative to (e.g. nyu/sync)")
    p.add_argument("--filelist", required=True, help="split list: 'rgb depth focal' per line")
    p.add_argument("--min-depth", type=float, default=1e-3, help="valid depth > this (m)")
    p.add_argument("--max-depth", type=float, default=10.0, help="valid depth <= this (m)")
    p.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
