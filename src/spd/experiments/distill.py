"""Distillation measured (issue 41): a sparse student trained only on a dense teacher's pseudo-labels,
against the teacher and against the same student trained on true labels. A small synthetic study.

    python -m spd.experiments.distill --out distill_out         # ~40 min on a 2-core CPU
    make distill-experiment                                     # the same

Three disjoint sets of synthetic rooms (`spd synth`, 120x160, Kinect-like holes, different seeds):
  A: labelled rooms the teacher trains on;
  B: rooms whose labels are withheld from the student: `spd distill label` writes the teacher's
     maps on B's images, and the students train on those (B's true labels train one control);
  C: held-out test rooms, where every model is scored (sparse protocol, 256 points per image).

The teacher is the dense control (`architecture=dense-control`: SPD's encoder and neck with a
DPT-style dense head, DESIGN.md §11), the students are `v15-tiny` SPD models; every model trains
with the demo's recipe (`v15_tiny_synth`: 1200 steps of batch 8) and is scored from its last
checkpoint (no selection on a validation set). Student variants: the plain recipe on the
pseudo-labels; + `loss.trim_fraction=0.1` (the largest 10 % of each image's log errors left out,
Depth Anything's trick against a teacher's mistakes); + `data.color_p=0.5` (photometric jitter on
the student's view only: the teacher labelled the clean image). Teacher and student total(256) are
timed at 480x640 in the same rounds (random weights: time does not depend on them).

Writes OUT/distill_experiment.json (every figure, the CPU, the commands) and prints a table. Data,
labels and runs already under OUT are reused or resumed, so an interrupted call continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from spd.cli import run_reporting_errors

SIZE = (120, 160)
STUDENT_VARIANTS = {  # name -> --set overrides on v15_tiny_synth, trained on B's pseudo-labels
    "student_pseudo": [],
    "student_pseudo_trim10": ["loss.trim_fraction=0.1"],
    "student_pseudo_color": ["data.color_p=0.5"],
}


def make_sets(out: Path, n_a: int, n_b: int, n_c: int, seed: int) -> dict[str, Path]:
    """A, B and C as `spd synth` folders (each with its own seed: disjoint rooms); B's image list."""
    from spd.data.synthetic import generate

    sets = {}
    for name, n_train, n_test, offset in (("A", n_a, 20, 1), ("B", n_b, 20, 2), ("C", 0, n_c, 3)):
        folder = out / f"data_{name}"
        if not (folder / "dense_test.yaml").is_file():
            generate(folder, n_train, n_test, SIZE, holes=True, seed=seed * 10 + offset, progress=False)
        sets[name] = folder
    images = sets["B"] / "images.txt"
    if not images.is_file():
        rows = [line.split()[0].lstrip("/") for line in (sets["B"] / "train_files.txt").read_text().splitlines() if line]
        images.write_text("".join(f"sync/{row}\n" for row in rows))
    return sets


STEPS: int | None = None  # --steps: the recipe's 1200 unless a quick check asks for fewer


def train_run(data: Path, run: Path, overrides: list[str], seed: int) -> Path:
    """`v15_tiny_synth` + overrides on `data`, resumed if begun; returns checkpoints/last."""
    from spd.config.training import load_config
    from spd.engine.train import run_finished, train

    if run_finished(run):  # reused as it is: a resumed finished run would write its checkpoint again
        return run / "checkpoints" / "last"
    cfg = load_config("v15_tiny_synth", [*overrides, "eval.every_steps=0"])
    cfg.seed = seed
    if STEPS is not None:
        cfg.max_steps = STEPS
    resume = (run / "checkpoints" / "last").is_dir()
    if train(cfg, data, run, resume=resume)["stopped"] == "preempted":
        raise KeyboardInterrupt  # saved; the next call resumes it
    return run / "checkpoints" / "last"


def label_b(sets: dict[str, Path], teacher: Path, out: Path) -> Path:
    """`spd distill label` on B's images with the teacher (as the command runs it); B's camera recorded."""
    from spd.data.synthetic import nyu_camera
    from spd.distill.images import list_images
    from spd.distill.label import LabelJob, LabelSettings, claim_output
    from spd.distill.teachers import load_teacher

    images = list_images(sets["B"] / "images.txt")
    settings = LabelSettings(intrinsics=nyu_camera(SIZE[1]))
    job = LabelJob(images, load_teacher(str(teacher)), out, settings,
                   command=f"spd distill label --images {sets['B'] / 'images.txt'} --teacher {teacher} --out {out} "
                           f"--intrinsics {','.join(f'{v:g}' for v in settings.intrinsics)}")
    claim_output(out, job.manifest, write=True)
    summary = job.run(progress=False)
    assert summary.description is not None, "one process labels every image"
    return summary.description


def score(model, description: Path) -> dict[str, float]:
    """abs_rel, delta1, rmse on a description's frames (sparse protocol, K = 256, no crop)."""
    from spd.data.described import DescribedDepth
    from spd.engine.evaluate import evaluate

    frames = DescribedDepth(description, split="test", num_queries=256)
    metrics, _ = evaluate(model, frames, "sparse", crop="none", progress=False)
    return {"abs_rel": metrics["abs_rel"], "delta1": metrics["delta1"], "rmse": metrics["rmse"]}


def timing(repeat: int) -> dict[str, float]:
    """total(256) ms at 480x640, teacher (dense control) and student (v15-tiny) in the same rounds."""
    import torch

    from spd.bench.totals import total_ms_in_rounds
    from spd.models.build import build_model
    from spd.models.dense_control import DenseControl

    torch.manual_seed(0)
    student = build_model("v15-tiny")
    teacher = DenseControl(student.config, warn_random_encoder=False)
    return total_ms_in_rounds({"teacher": teacher, "student": student}, 480, 640, k=256, repeat=repeat)


def run(out: Path, n_a: int, n_b: int, n_c: int, seed: int, variants: list[str], repeat: int) -> dict:
    from spd.bench.machine import cpu_facts
    from spd.models.constant import ConstantDepth, median_training_depth
    from spd.cli.models import load_any_model
    from spd.data.described import DescribedDepth

    out.mkdir(parents=True, exist_ok=True)
    sets = make_sets(out, n_a, n_b, n_c, seed)
    test = sets["C"] / "dense_test.yaml"
    result: dict = {"what": "synthetic study (procedural rooms, 120x160, random-init encoders); not an NYU result",
                    "machine": cpu_facts(), "sets": {"A": n_a, "B": n_b, "C": n_c, "size": list(SIZE)},
                    "recipe": "v15_tiny_synth (1200 steps, batch 8, K = 32), last checkpoint, eval.every_steps=0",
                    "command": " ".join(["python -m spd.experiments.distill", *sys.argv[1:]]), "commands": {},
                    "models": {}}
    path = out / "distill_experiment.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=2))

    teacher = train_run(sets["A"] / "dense.yaml", out / "run_teacher", ["architecture=dense-control"], seed)
    result["commands"]["teacher"] = (f"spd train --config v15_tiny_synth --data-root {sets['A'] / 'dense.yaml'} "
                                     f"--out {out / 'run_teacher'} --set architecture=dense-control --set eval.every_steps=0")
    result["models"]["teacher (dense control, A's labels)"] = score(load_any_model(str(teacher), "cpu"), test)
    save()
    pseudo = label_b(sets, teacher, out / "labels_B")
    result["commands"]["label"] = json.loads((out / "labels_B" / "manifest.json").read_text())["command"]
    runs = {name: (pseudo, overrides) for name, overrides in STUDENT_VARIANTS.items() if name in variants}
    runs["student_true_labels"] = (sets["B"] / "dense.yaml", [])
    for name, (data, overrides) in runs.items():
        folder = train_run(data, out / f"run_{name}", overrides, seed)
        result["commands"][name] = (f"spd train --config v15_tiny_synth --data-root {data} --out {out / f'run_{name}'} "
                                    + " ".join(f"--set {o}" for o in [*overrides, "eval.every_steps=0"]))
        result["models"][name] = {"overrides": overrides, **score(load_any_model(str(folder), "cpu"), test)}
        save()
    median = median_training_depth(DescribedDepth(sets["B"] / "dense.yaml", split="test", num_queries=256))
    result["models"]["training-set median (B's true labels)"] = {"depth_m": median, **score(ConstantDepth(median), test)}
    result["total_256_ms_480x640"] = timing(repeat)
    teacher_abs_rel = result["models"]["teacher (dense control, A's labels)"]["abs_rel"]
    result["student_over_teacher_abs_rel"] = {name: result["models"][name]["abs_rel"] / teacher_abs_rel
                                              for name in runs}
    save()
    return result


def table(result: dict) -> str:
    lines = [f"{'model':<40}{'abs_rel':>9}{'delta1':>9}{'rmse':>8}"]
    for name, row in result["models"].items():
        lines.append(f"{name:<40}{row['abs_rel']:>9.4f}{row['delta1']:>9.3f}{row['rmse']:>8.3f}")
    times = result["total_256_ms_480x640"]
    lines.append(f"total(256) at 480x640: teacher {times['teacher']:.1f} ms, student {times['student']:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spd.experiments.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("distill_out"))
    parser.add_argument("--n-a", type=int, default=1000, help="labelled rooms the teacher trains on")
    parser.add_argument("--n-b", type=int, default=1000, help="unlabelled rooms the students train on")
    parser.add_argument("--n-c", type=int, default=50, help="held-out test rooms")
    parser.add_argument("--variants", default=",".join(STUDENT_VARIANTS),
                        help=f"pseudo-label students to train, of {','.join(STUDENT_VARIANTS)}")
    parser.add_argument("--repeat", type=int, default=7, help="timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the recipe's 1200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    global STEPS
    STEPS = args.steps
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in STUDENT_VARIANTS for v in variants):
        parser.error(f"--variants: choose from {','.join(STUDENT_VARIANTS)}")
    if min(args.n_a, args.n_b, args.n_c, args.repeat) < 1:
        parser.error("--n-a, --n-b, --n-c and --repeat must be positive")

    def experiment() -> int:
        result = run(args.out, args.n_a, args.n_b, args.n_c, args.seed, variants, args.repeat)
        print(table(result))
        print(f"written: {args.out / 'distill_experiment.json'}")
        return 0

    return run_reporting_errors(parser.prog, experiment, os.environ.get("SPD_DEBUG") == "1")


if __name__ == "__main__":
    raise SystemExit(main())
