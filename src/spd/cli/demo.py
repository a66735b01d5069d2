"""`spd demo`: end to end on synthetic rooms: data, training, evaluation, figures (CPU, minutes)."""

from __future__ import annotations

import argparse

from spd.cli.args import image_size, non_negative_int, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end to end on synthetic data: data, training, evaluation, figures (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--n-train", type=positive_int, default=1000, help="synthetic training frames (default 1000)")
    p.add_argument("--n-test", type=positive_int, default=50, help="synthetic test frames (default 50)")
    p.add_argument("--size", type=image_size, default=(120, 160), help="frame size HxW (default 120x160)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="training steps (default: the v15_tiny_synth config's)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="data and training seed (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo in --out (the default: a rerun of the same command continues it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex

    from spd.experiments.demo import run_demo

    # the command that continues it, as typed (the demo resumes whenever --out holds its run)
    words = [w for w in getattr(args, "argv", ["demo"]) if w not in ("--resume", "--debug")]
    hint = "continue with: spd " + " ".join(shlex.quote(w) for w in words)
    run_demo(args.out, args.n_train, args.n_test, args.size, args.max_steps, args.seed, resume_hint=hint)
    return 0
