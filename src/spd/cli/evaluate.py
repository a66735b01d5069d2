"""`spd eval`: score a model on NYU-layout data or a dataset description (sparse or dense protocol)."""

from __future__ import annotations

import argparse
import json
import math

from spd.cli.args import (add_device, add_inference_dtype, check_depth_range, check_output_file, non_negative_int,
                          positive_float, positive_int)
from spd.cli.models import load_any_model, weights_sha256
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on NYU-layout data (sparse or dense protocol)")
    p.add_argument("--model", required=True,
                   help="model folder or Hub id; also median:<metres> or baseline:<folder|random>")
    p.add_argument("--data-root", required=True,
                   help="dataset root, as for `spd train`: NYU's BTS layout or `spd synth` output; or a dataset "
                        "description .yaml (its list is evaluated, no crop)")
    p.add_argument("--test-dir", default="official_splits/test",
                   help="test images under the root; the list's paths are relative to it (default official_splits/test)")
    p.add_argument("--filelist", default=None,
                   help="split list (default: <root>/test_files.txt as `spd synth` writes it, else the bundled Eigen test list)")
    p.add_argument("--protocol", choices=["sparse", "dense"], default="sparse",
                   help="sparse: K fixed-seed points per image; dense: every valid pixel of the crop (default sparse)")
    p.add_argument("--k", type=positive_int, default=256, help="points per image for the sparse protocol (default 256)")
    p.add_argument("--chunk", type=positive_int, default=256, help="queries per decode call, dense protocol (default 256)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="point sampling / shuffling seed (default 0)")
    p.add_argument("--crop", choices=["eigen", "garg", "none"], default="eigen", help="evaluation crop (default eigen)")
    p.add_argument("--min-depth", type=positive_float, default=1e-3, help="eval range lower bound [m] (default 1e-3)")
    p.add_argument("--max-depth", type=positive_float, default=10.0, help="eval range upper bound [m] (default 10)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    add_device(p)
    add_inference_dtype(p)
    p.add_argument("--out", default=None, help="write the metrics as JSON here (with the model, weights checksum, data)")
    p.set_defaults(func=run)


def _test_dataset(args: argparse.Namespace):
    """(dataset, its list): a description's own list (no NYU crop), else the NYU layout's test split."""
    from pathlib import Path

    from spd.data import NYUDepth, resolve_split_list
    from spd.data.described import DescribedDepth, is_description

    root = Path(args.data_root)
    queries = args.k if args.protocol == "sparse" else None
    if is_description(root):
        args.crop = "none"
        return DescribedDepth(root, "test", num_queries=queries, seed=args.seed, min_depth=args.min_depth,
                              max_depth=args.max_depth), root
    filelist = resolve_split_list(root, args.filelist, "test")
    return NYUDepth(root / args.test_dir, filelist, split="test", num_queries=queries, seed=args.seed,
                    eval_crop=args.crop, min_depth=args.min_depth, max_depth=args.max_depth), filelist


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from spd.engine.evaluate import evaluate
    from spd.metrics import format_metrics
    from spd.models.precision import low_precision_copy

    check_output_file(args.out, "--out")
    check_depth_range(args.min_depth, args.max_depth)
    dataset, filelist = _test_dataset(args)
    model = load_any_model(args.model, args.device)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.dtype == "bf16":
        model = low_precision_copy(model)
    with autocast:
        metrics, acc = evaluate(model, dataset, args.protocol, args.k, args.chunk, args.crop, args.seed,
                                args.min_depth, args.max_depth, args.device, limit=args.limit)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise UserInputError(f"non-finite metrics {metrics}: the model returned NaN or infinite depths; nothing written")
    print(f"{args.protocol} protocol, {acc.count} images ({acc.skipped} without valid GT), crop {args.crop}")
    print(format_metrics({args.model: metrics}))
    if args.out:
        provenance = {"model": args.model, "weights_sha256": weights_sha256(args.model), "data_root": str(Path(args.data_root)),
                      "test_dir": args.test_dir, "filelist": str(filelist), "protocol": args.protocol, "k": args.k,
                      "seed": args.seed, "crop": args.crop, "min_depth": args.min_depth, "max_depth": args.max_depth}
        Path(args.out).write_text(json.dumps({**provenance, "images": acc.count, "metrics": metrics}, indent=2))
    return 0
