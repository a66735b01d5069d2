"""`spd train`: one training run (one process, or many under torchrun), resumable."""

from __future__ import annotations

import argparse

from spd.cli.args import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (one process, or many under torchrun)",
        description="Train SPD. Under `torchrun --nproc-per-node N spd train ...` it uses DDP (NCCL on GPUs, gloo on CPU).",
    )
    p.add_argument("--config", required=True, help="bundled config name (v15_nyu, v15_tiny_synth) or a YAML path")
    p.add_argument("--data-root", required=True,
                   help="NYU root holding sync/ and official_splits/test/ (or `spd synth` output), or a dataset "
                        "description .yaml (your own data: list + val_list)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, checkpoints/{last,best}")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="total optimiser steps (a resumed run stops at the same step)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last if it exists")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from a saved SPD model's weights (fine-tuning: new optimiser and schedule; "
                        "the model config must match)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that already holds a run (deletes it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted keys: --set optim.lr=3e-4 --set model.use_ldrm=false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.config.training import load_config
    from spd.data.described import is_description, read_description
    from spd.engine.train import train
    from spd.errors import EXIT_PREEMPTED, DataLayoutError

    cfg = load_config(args.config, args.set)
    if is_description(args.data_root):
        read_description(args.data_root)  # before the run folder is touched
    elif not Path(args.data_root).is_dir():
        raise DataLayoutError(f"--data-root {args.data_root}: not a folder (or a dataset description .yaml)")
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.init_from is not None:
        cfg.init_from = args.init_from
    result = train(cfg, args.data_root, args.out, resume=args.resume, overwrite=args.overwrite)
    if result["stopped"] == "preempted":
        return EXIT_PREEMPTED  # saved; a scheduler may requeue the job with --resume
    if result["last_val"] is not None:
        print(f"step {result['step']}: val abs_rel {result['last_val']['abs_rel']:.4f} "
              f"(best {result['best_abs_rel']:.4f}); model folder: {args.out}/checkpoints/best")
    else:
        print(f"step {result['step']}: no validation; model folder: {args.out}/checkpoints/last")
    return 0
