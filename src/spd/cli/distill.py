"""`spd distill label`: a dense teacher's pseudo-labels on unlabelled images, as a dataset description
that `spd train` (alone or in `data.mix`) trains a sparse student on (spd.distill)."""

from __future__ import annotations

import argparse
import sys

from spd.cli.args import add_device, add_inference_dtype, positive_float, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("distill", help="label your own images with a dense teacher, then `spd train` a student")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="DISTILL_COMMAND")
    p = sub.add_parser(
        "label", help="write a teacher's depth maps on unlabelled images as a dataset description",
        description="Label every image of --images with --teacher's depth (metres; 0 = no label) into --out: "
                    "labels/, train.txt, val.txt, labels.yaml and manifest.json. Resumable (rerun the same command), "
                    "shardable (--shard I/N, or torchrun). Then: spd train --data-root OUT/labels.yaml ...",
    )
    p.add_argument("--images", required=True, help="a folder of images (recursive) or a text file listing them")
    p.add_argument("--teacher", required=True,
                   help="a transformers depth-estimation folder (config.json + weights + preprocessor_config.json), "
                        "an SPD model folder (v15, dense control), or baseline:FOLDER (DAv2-S as `spd train` saves it)")
    p.add_argument("--out", required=True, help="output folder (new, or this command's earlier run: it resumes)")
    p.add_argument("--teacher-space", choices=["metric", "disparity", "affine-depth"], default=None,
                   help="what the teacher predicts, for models whose config does not say (relative spaces need --align)")
    p.add_argument("--align", default=None, metavar="DESCRIPTION.yaml",
                   help="metric points (LiDAR, SfM) per image for a relative teacher: a dataset description whose RGB "
                        "paths are these images; a scale and shift per image are fitted in the teacher's space")
    p.add_argument("--intrinsics", default=None,
                   help="the images' camera, fx,fy,cx,cy in their pixels (or a file as for `spd predict`): recorded in "
                        "labels.yaml so that training applies the canonical-camera rule")
    p.add_argument("--max-depth", type=positive_float, default=10.0, help="teacher depths above this are no label (m)")
    p.add_argument("--format", dest="label_format", choices=["npy", "png"], default="npy",
                   help="npy: float16 metres (default); png: uint16 millimetres (at most 65.535 m)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per teacher call (default 4)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of images (by a hash of the name) listed in val.txt for validation (default 0.05)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="label only shard I of N (array jobs); the shards' union is one process's output")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave unreadable image files out (listed in the manifest) instead of stopping")
    add_device(p)
    add_inference_dtype(p)
    p.set_defaults(func=run_label)


def run_label(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch.distributed as dist

    from spd.cameras.intrinsics import read_intrinsics
    from spd.distill.images import list_images
    from spd.distill.label import LabelJob, LabelSettings, Shard, claim_output, command_line, environment_rank, parse_shard
    from spd.distill.teachers import load_teacher

    settings = LabelSettings(args.max_depth, args.label_format, args.batch_size, args.dtype, args.val_fraction,
                             read_intrinsics(args.intrinsics) if args.intrinsics else None)
    settings.check()
    shard = parse_shard(args.shard) if args.shard else Shard()
    out = Path(args.out)
    rank, world = environment_rank()
    device = args.device
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":
            import os

            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    images = list_images(args.images, args.skip_unreadable)
    teacher = load_teacher(args.teacher, device, args.dtype, args.teacher_space)
    job = LabelJob(images, teacher, out, settings, shard, args.align, command_line(args.argv), rank, world)
    claim_output(out, job.manifest, write=rank == 0)  # before any label; a foreign folder is refused here
    if world > 1:
        dist.barrier()  # the manifest exists before any rank writes a label
    summary = job.run(progress=rank == 0)
    if world > 1:
        dist.barrier()  # every rank's labels are written: rank 0 sees the whole set
        if rank == 0 and not summary.complete:
            summary.present = sum(path.is_file() for path in job.label_paths)
            summary.complete = summary.present == summary.total
            summary.description = job.write_description() if summary.complete else None
        dist.destroy_process_group()
    if rank != 0:
        return 0
    skipped = f", {len(images.skipped)} unreadable skipped" if images.skipped else ""
    print(f"labelled {summary.labelled_now} image(s) now; {summary.present} of {summary.total} present{skipped}")
    if summary.failed_alignment:
        print(f"spd distill label: warning: {len(summary.failed_alignment)} image(s) had too few alignment points or a "
              f"scale <= 0 and carry no label (e.g. {summary.failed_alignment[0]})", file=sys.stderr)
    if summary.description is not None:
        print(f"dataset description: {summary.description}  (next: spd data check --dataset {summary.description}; "
              f"spd train --config CONFIG --data-root {summary.description} --out RUN)")
    else:
        print("the other shards' labels are still missing: labels.yaml is written by the run that finds every label "
              "present (rerun any shard, or the command without --shard, once they are done)")
    return 0
