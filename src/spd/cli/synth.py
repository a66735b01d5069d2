"""`spd synth`: a synthetic NYU-layout dataset of procedural rooms with exact depth."""

from __future__ import annotations

import argparse

from spd.cli.args import image_size, non_negative_int, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic NYU-layout dataset (procedural rooms, exact depth)")
    p.add_argument("--out", required=True, help="output folder (sync/, official_splits/test/, *_files.txt)")
    p.add_argument("--n-train", type=positive_int, required=True, help="training frames")
    p.add_argument("--n-test", type=positive_int, required=True, help="test frames")
    p.add_argument("--size", type=image_size, default=(480, 640), help="HxW (default 480x640, NYU's size)")
    p.add_argument("--holes", action="store_true", help="add Kinect-like holes (depth 0) to the depth maps")
    p.add_argument("--sparse", type=non_negative_int, default=0,
                   help="also write sparse.yaml: N point labels (u,v,depth_m CSV) per image (default 0: none)")
    p.add_argument("--intrinsics", default=None,
                   help="the camera: fx,fy,cx,cy in pixels of the written size, or a file as for `spd predict` "
                        "(default: NYU's, scaled to the width). The same --seed gives the same rooms and poses")
    p.add_argument("--seed", type=non_negative_int, default=0, help="frame i depends only on (seed, split, i)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spd.cameras.intrinsics import read_intrinsics
    from spd.data.synthetic import generate

    intrinsics = read_intrinsics(args.intrinsics) if args.intrinsics else None
    out = generate(args.out, args.n_train, args.n_test, args.size, args.holes, args.seed, args.workers, sparse=args.sparse,
                   intrinsics=intrinsics)
    print(f"wrote {args.n_train} train + {args.n_test} test frames to {out} "
          f"(lists: {out / 'train_files.txt'}, {out / 'test_files.txt'}; descriptions: {out / 'dense.yaml'}"
          + (f", {out / 'sparse.yaml'} with {args.sparse} labels per image)" if args.sparse else ")"))
    return 0
