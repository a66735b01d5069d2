"""`spd data check`: validate every file of a split list or dataset description, with a summary."""

from __future__ import annotations

import argparse

from spd.cli.args import check_depth_range, positive_float
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("check", help="validate every file of a split list and print a summary")
    p.add_argument("--root", default=None, help="folder the list's paths are relative to (e.g. nyu/sync)")
    p.add_argument("--filelist", default=None, help="split list: 'rgb depth focal' per line")
    p.add_argument("--dataset", default=None, help="or a dataset description (.yaml): your own data, dense or sparse labels")
    p.add_argument("--min-depth", type=positive_float, default=1e-3, help="valid depth > this (m)")
    p.add_argument("--max-depth", type=positive_float, default=10.0, help="valid depth <= this (m)")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.data.check import check_dataset, check_description
    from spd.errors import DataLayoutError

    check_depth_range(args.min_depth, args.max_depth)
    if args.dataset is not None:
        if not Path(args.dataset).is_file():
            raise DataLayoutError(f"--dataset {args.dataset}: not found")
        report = check_description(args.dataset, args.min_depth, args.max_depth)
        print(report.summary())
        return 0 if report.ok else 1
    if args.root is None or args.filelist is None:
        raise UserInputError("give --dataset DESCRIPTION.yaml, or --root and --filelist (the NYU layout)")
    for flag, path in (("--filelist", args.filelist), ("--root", args.root)):
        if not Path(path).exists():  # an argument mistake, not a finding of the check
            raise DataLayoutError(f"{flag} {path}: not found")
    report = check_dataset(args.root, args.filelist, args.min_depth, args.max_depth)
    print(report.summary())
    return 0 if report.ok else 1
