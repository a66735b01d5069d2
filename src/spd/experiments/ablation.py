"""`spd ablate`: the plan's §10.5 ablation table in one command (DESIGN.md §11).

From one training config and one dataset, every requested variant trains as its own run folder
(`OUT/runs/<variant>`, a plain `spd train` folder: a finished run is skipped, an interrupted one
resumes), is evaluated with one protocol (the sparse protocol at K points of the dataset's test
split, the final weights: no selection on the test set), and all are timed in one process at the
training frames' size (`spd.bench.totals`). Variants that differ only at evaluation (K) share one
training run. The report is `ablation.json`, `ablation.md` and `ablation.png` (`ablation_report`).

Every variant is the config plus `--set` overrides, so the same runs can go to a cluster:
`--print-commands` prints one `spd train` command per variant (prefix `torchrun ...` for DDP), and a
later `spd ablate` with the same arguments evaluates what they trained.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from spd.config.training import TrainConfig, load_config
from spd.errors import ConfigError

STUDY_K = 256  # evaluation points per image, and the K of total(K)


@dataclass(frozen=True)
class Variant:
    """One row group of the study: the training config's overrides and the K it is evaluated at."""

    name: str
    change: str  # what differs from the config's model, for the table
    settings: tuple[str, ...]  # `--set KEY=VALUE` overrides of the training config
    eval_ks: tuple[int, ...] = (STUDY_K,)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("v15", "the config's model (v15)", ()),
    Variant("v14", "v14: Q2Q, 2 L4 self-attention layers, L3/L4 projected to d, no LDRM",
            ("model.global_projection=true", "model.q2q_self_attn=true", "model.l4_self_attn_layers=2",
             "model.use_ldrm=false")),
    Variant("no-ldrm", "v15 - LDRM", ("model.use_ldrm=false",)),
    Variant("l3l4-projected", "v15 - native L3/L4 widths (projected to d in the neck)", ("model.global_projection=true",)),
    Variant("q2q", "v15 + Q2Q self-attention", ("model.q2q_self_attn=true",)),
    Variant("k128", "v15 trained with K = 128 queries per image", ("data.num_queries=128",), eval_ks=(128, STUDY_K)),
    Variant("dense-control", "same encoder + neck, DPT-style dense head", ("architecture=dense-control",)),
    Variant("dav2-small", "Depth Anything V2-Small (ViT-S), same training", ("architecture=dav2-small",)),
)}


def variant_config(config: str, sets: list[str], variant: Variant, max_steps: int | None) -> TrainConfig:
    """The training config of one variant: the study's config, its `--set`s, then the variant's own."""
    cfg = load_config(config, [*sets, *variant.settings])
    if max_steps is not None:
        cfg.max_steps = max_steps
    return cfg


def train_command(config: str, data_root: str, run_dir: Path, sets: list[str], variant: Variant,
                  max_steps: int | None) -> str:
    """The `spd train` command that trains one variant's run folder (resumable)."""
    parts = ["spd", "train", "--config", config, "--data-root", str(data_root), "--out", str(run_dir), "--resume"]
    if max_steps is not None:
        parts += ["--max-steps", str(max_steps)]
    for setting in [*sets, *variant.settings]:
        parts += ["--set", setting]
    return shlex.join(parts)


def is_trained(run_dir: Path, cfg: TrainConfig) -> bool:
    """A run folder whose last checkpoint finished the config's step budget."""
    from spd.engine.checkpoint import find_resumable, load_training_state
    from spd.engine.train import run_finished

    if not run_finished(run_dir):
        return False
    progress = load_training_state(find_resumable(run_dir / "checkpoints"))["progress"]
    return cfg.max_steps is None or progress["step"] >= cfg.max_steps


def load_trained(run_dir: Path, cfg: TrainConfig) -> torch.nn.Module:
    """The final weights of a finished run (checkpoints/last), as each architecture loads them."""
    folder = run_dir / "checkpoints" / "last"
    if cfg.architecture == "dav2-small":
        from spd.models.baseline import load_baseline

        return load_baseline(str(folder))
    if cfg.architecture == "dense-control":
        from spd.models.dense_control import load_dense_control

        return load_dense_control(folder)
    from spd.models.spd import load_model

    return load_model(folder)


def inference_parameters(model: torch.nn.Module) -> int:
    """Parameters used at inference: all, less SPD's training-only heads."""
    skip = getattr(model, "TRAINING_ONLY_MODULES", ())
    return sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] not in skip)


def evaluate_at(model, cfg: TrainConfig, data_root: str | Path, k: int, run_dir: Path, cache: Path) -> dict:
    """Sparse-protocol metrics at K points per test image (every test image: no `eval.limit`), cached
    in `cache` by the weights' checksum so that a rerun evaluates only what changed."""
    from spd.engine.data_setup import resolve_data
    from spd.engine.evaluate import evaluate

    checksum = _sha256(run_dir / "checkpoints" / "last" / "model.safetensors")
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("weights_sha256") == checksum:
            return saved["metrics"]
    at_k = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_queries=k, limit=None, every_steps=1))
    _, test_set = resolve_data(at_k, data_root)
    e = at_k.eval
    metrics, acc = evaluate(model, test_set, "sparse", k, crop=e.crop, seed=e.seed, min_depth=e.min_depth,
                            max_depth=e.max_depth, progress=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"weights_sha256": checksum, "k": k, "images": acc.count, "metrics": metrics}, indent=2))
    return metrics


def _sha256(path: Path) -> str:
    from spd.models.folder import file_sha256

    return file_sha256(path)


def resolve_variants(names: list[str] | None) -> list[Variant]:
    names = list(VARIANTS) if not names else names
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown ablation variants {unknown}; choose from {list(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(names)]


def run_ablation(config: str, data_root: str | Path, out: str | Path, variants: list[Variant], sets: list[str] = (),
                 max_steps: int | None = None, repeat: int = 9, progress: bool = True, log=print) -> dict:
    """Trains what is not trained, evaluates, times, and writes the report. Returns the report dict,
    or {"stopped": "preempted", "variant": name} when a training run was interrupted (saved, resumable)."""
    from spd.bench.totals import total_ms_in_rounds
    from spd.engine.train import train
    from spd.experiments.ablation_report import write_report

    out, sets = Path(out), list(sets)
    trained: dict[str, tuple[Variant, TrainConfig, torch.nn.Module]] = {}
    for variant in variants:
        cfg = variant_config(config, sets, variant, max_steps)
        run_dir = out / "runs" / variant.name
        if is_trained(run_dir, cfg):
            log(f"{variant.name}: trained already ({run_dir})")
        else:
            log(f"{variant.name}: training in {run_dir}")
            resume = run_dir.exists()  # an interrupted run continues; a new one starts without a notice
            if train(cfg, data_root, run_dir, resume=resume, progress=progress)["stopped"] == "preempted":
                return {"stopped": "preempted", "variant": variant.name}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random-encoder notices: the weights come from the run
            trained[variant.name] = (variant, cfg, load_trained(run_dir, cfg))
    rows = []
    for name, (variant, cfg, model) in trained.items():
        for k in variant.eval_ks:
            metrics = evaluate_at(model, cfg, data_root, k, out / "runs" / name, out / "evals" / f"{name}_k{k}.json")
            rows.append({"variant": name, "change": variant.change, "train_k": cfg.data.num_queries, "eval_k": k,
                         "architecture": cfg.architecture, "parameters": inference_parameters(model),
                         "steps": cfg.max_steps, "metrics": metrics})
            log(f"{name} @ K={k}: abs_rel {metrics['abs_rel']:.4f}")
    _add_timings(rows, trained, data_root, repeat, total_ms_in_rounds)
    return write_report(out, rows, config=config, data_root=str(data_root), sets=sets, max_steps=max_steps)


def _add_timings(rows: list[dict], trained: dict, data_root, repeat: int, timer) -> None:
    """total(K) ms per row at the training frames' size, all models timed in one round-robin per K."""
    from spd.engine.data_setup import resolve_data

    first_cfg = next(iter(trained.values()))[1]
    frame = resolve_data(first_cfg, data_root)[0]
    first = frame.parts[0] if hasattr(frame, "parts") else frame
    height, width = first.load(0)[0].shape[:2]
    models = {name: model for name, (_, _, model) in trained.items()}
    for k in sorted({row["eval_k"] for row in rows}):
        names = [row["variant"] for row in rows if row["eval_k"] == k]
        times = timer({n: models[n] for n in names}, height, width, k=k, repeat=repeat)
        for row in rows:
            if row["eval_k"] == k:
                row["total_ms"] = times[row["variant"]]
                row["timed_at"] = [height, width]
