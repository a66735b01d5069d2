"""The (K, 2) query points of `spd predict`, from --points, --points-file or --grid."""

from __future__ import annotations

import argparse

from spd.errors import UserInputError


def read_points(args: argparse.Namespace, height: int, width: int):
    """The (K, 2) points from --points, --points-file or --grid; UserInputError naming the problem
    (the values are checked against the image by the predictor)."""
    import numpy as np

    if args.points is not None:
        pairs = [pair for pair in args.points.split(";") if pair.strip()]
        if not pairs:
            raise UserInputError("--points: no points given (use 'u,v;u,v')")
        try:
            points = [[float(x) for x in pair.split(",")] for pair in pairs]
        except ValueError:
            raise UserInputError(f"--points must look like 'u,v;u,v', got {args.points!r}") from None
        if any(len(p) != 2 for p in points):
            raise UserInputError(f"--points must look like 'u,v;u,v' (two numbers per point), got {args.points!r}")
        return np.array(points)
    if args.points_file is not None:
        return read_points_file(args.points_file)
    from spd.predictor import grid_points

    if args.grid > min(height, width):
        raise UserInputError(f"--grid {args.grid}: at most one point per pixel row and column, so at most "
                             f"{min(height, width)} for this {width}x{height} image")
    return grid_points(args.grid, height, width)


def read_points_file(path: str):
    """A CSV of `u,v` per line (an optional header line is skipped; UTF-8, or UTF-16 / UTF-8 with a BOM)
    -> (K, 2) array."""
    import numpy as np

    from spd.data.io import parse_number_rows, read_text

    lines = read_text(path).splitlines()  # BOM-aware (UTF-16 from spreadsheets); one line naming the file otherwise
    rows, bad = parse_number_rows(lines, 2)
    if bad is not None:
        raise UserInputError(f"{path}: line {bad} is not 'u,v': {lines[bad - 1]!r}")
    if not rows:
        raise UserInputError(f"{path}: no points in the file")
    return np.array(rows).reshape(-1, 2)
