"""Training configuration: dataclasses, named YAML configs, `--set key=value` overrides.

A run is fully described by its resolved config, written to RUN_DIR/config.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from spd.config.model import ModelConfig, preset_config
from spd.config.checks import Rule, check_config, non_negative, optional, positive, unit_interval
from spd.errors import ConfigError


@dataclass
class DataConfig:
    root: str | None = None  # NYU root holding sync/ and official_splits/test/ (--data-root)
    train_dir: str = "sync"  # relative to root
    train_list: str | None = None  # None: ROOT/train_files.txt if present, else the bundled NYU list
    test_dir: str = "official_splits/test"
    test_list: str | None = None  # None: ROOT/test_files.txt if present, else the bundled Eigen test list
    crop_size: list[int] | None = field(default_factory=lambda: [416, 544])  # BTS random crop
    rotation_deg: float = 2.5
    color_p: float = 0.5
    # Camera augmentation (spd.camera): each training image is enlarged by s ~ U(1, zoom) around a
    # random window, which multiplies its focal length by s, so the labels' canonical depth changes
    # with s and the model must read depth from apparent size. 1 = off (the BTS recipe).
    zoom: float = 1.0
    num_queries: int = 256  # K per training image
    min_depth: float = 0.1  # training GT range (0.1, 10] m
    max_depth: float = 10.0
    workers: int = 4
    # More training sets mixed with the --data-root one: [{"dataset": NYU root or description .yaml,
    # "weight": w}]; each draws a share weight / (sum of weights, `weight` included) of every epoch.
    mix: list[dict[str, Any]] = field(default_factory=list)
    weight: float = 1.0  # the --data-root training set's weight in a mix

    RULES: ClassVar[dict[str, Rule]] = {
        "mix": (lambda entries: all(isinstance(e, dict) and set(e) == {"dataset", "weight"} and isinstance(e["dataset"], str)
                                    and isinstance(e["weight"], (int, float)) and e["weight"] > 0 for e in entries),
                'a list of {"dataset": PATH, "weight": number > 0}'),
        "weight": (positive, "> 0"),
        "crop_size": (optional(lambda s: len(s) == 2 and all(v > 0 and v % 32 == 0 for v in s)),
                      "null or [height, width], positive multiples of 32"),
        "rotation_deg": (non_negative, ">= 0"), "color_p": (unit_interval, "in [0, 1]"),
        "zoom": (lambda v: 1 <= v < float("inf"), "finite and >= 1"),
        "num_queries": (positive, "> 0"), "min_depth": (positive, "> 0"), "max_depth": (positive, "> 0"),
        "workers": (non_negative, ">= 0"),
    }


@dataclass
class OptimConfig:
    lr: float = 1e-4  # decoder + neck
    encoder_lr_scale: float = 0.1  # encoder at 1e-5: keep the FCMAE features
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 500
    schedule: Literal["cosine", "poly"] = "cosine"
    min_lr_ratio: float = 0.01  # final LR / peak LR
    grad_clip: float = 1.0

    RULES: ClassVar[dict[str, Rule]] = {
        "lr": (positive, "> 0"), "encoder_lr_scale": (non_negative, ">= 0"), "weight_decay": (non_negative, ">= 0"),
        "betas": (lambda b: len(b) == 2 and all(0 <= v < 1 for v in b), "two numbers in [0, 1)"),
        "warmup_steps": (non_negative, ">= 0"), "min_lr_ratio": (unit_interval, "in [0, 1]"),
        "grad_clip": (positive, "> 0"),
    }


@dataclass
class LossConfig:
    canvas_weight: float = 0.5
    patch_weight: float = 0.3
    silog_lambda: float = 0.5
    dense_weight: float = 1.0  # dense models only (baseline, dense control): SILog of the full map, beside the sparse term
    # Share of each image's labelled entries with the largest log error left out of every SILog term
    # (Depth Anything's trick against a teacher's pseudo-label mistakes). 0 = off: measured on the
    # distillation study (docs/distillation.md) before any recipe turns it on.
    trim_fraction: float = 0.0

    RULES: ClassVar[dict[str, Rule]] = {
        "canvas_weight": (non_negative, ">= 0"), "patch_weight": (non_negative, ">= 0"),
        "silog_lambda": (unit_interval, "in [0, 1]"), "dense_weight": (non_negative, ">= 0"),
        "trim_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    }


@dataclass
class BaselineConfig:
    """Used when `architecture: dav2-small` (the Depth Anything V2-Small baseline)."""

    weights: str | None = None  # a local Hugging Face folder to start from; None = random init
    input_mode: Literal["fair", "official"] = "fair"  # see spd.models.baseline
    max_depth: int = 10  # metres, the metric head's range

    RULES: ClassVar[dict[str, Rule]] = {"max_depth": (positive, "> 0")}


@dataclass
class EvalConfig:
    every_steps: int = 2000  # periodic validation (0 = only at the end)
    num_queries: int = 256  # sparse protocol K
    seed: int = 0
    crop: Literal["eigen", "garg", "none"] = "eigen"
    limit: int | None = None  # validate on the first N test images (None = all)
    min_depth: float = 1e-3
    max_depth: float = 10.0

    RULES: ClassVar[dict[str, Rule]] = {
        "every_steps": (non_negative, ">= 0"), "num_queries": (positive, "> 0"), "limit": (optional(positive), "null or > 0"),
        "min_depth": (positive, "> 0"), "max_depth": (positive, "> 0"),
    }


@dataclass
class TrainConfig:
    # "dav2-small": the dense DAv2-S baseline; "dense-control": SPD's encoder + neck with a dense head (§11)
    architecture: Literal["spd", "dav2-small", "dense-control"] = "spd"
    preset: str = "v15"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's ModelConfig
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: int = 25
    max_steps: int | None = None  # total optimiser steps; overrides epochs when set
    batch_size: int = 6  # per process
    accum_steps: int = 1
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    deterministic: bool = False
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 2  # step_* checkpoint folders kept besides last/ and best/
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    save_first_step_grads: bool = False  # write RUN_DIR/first_step_grads.safetensors (scale-out checks)
    init_from: str | None = None  # a saved SPD model folder whose weights start the run (fine-tuning; new optimiser)
    # Parts whose activations are recomputed in backward instead of kept (SPD only; exact): "encoder",
    # "ldrm". Both: ~0.3 of the activation memory for ~1.2x the step time (docs/speed.md, training step).
    activation_checkpointing: list[str] = field(default_factory=list)

    RULES: ClassVar[dict[str, Rule]] = {
        "epochs": (positive, "> 0"), "max_steps": (optional(positive), "null or > 0"), "batch_size": (positive, "> 0"),
        "accum_steps": (positive, "> 0"), "seed": (non_negative, ">= 0"), "log_every": (positive, "> 0"),
        "ckpt_every": (positive, "> 0"), "keep_last": (non_negative, ">= 0"), "max_nonfinite": (positive, "> 0"),
        "activation_checkpointing": (lambda parts: isinstance(parts, list) and set(parts) <= {"encoder", "ldrm"},
                                     'a list of "encoder", "ldrm"'),
    }

    def model_config(self) -> ModelConfig:
        try:
            return preset_config(self.preset, **self.model)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls, data: dict[str, Any], where: str = ""):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config keys {[where + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def named_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("spd.config.recipes").iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """A bundled config by name (`v15_nyu`, `v15_tiny_synth`) or a YAML file, then `key=value` overrides
    with dotted keys (`optim.lr=3e-4`, `model.use_ldrm=false`); values are parsed as YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path}: cannot read it as UTF-8 text ({err})") from None
    else:
        resource = resources.files("spd.config.recipes").joinpath(f"{name_or_path}.yaml")
        if not resource.is_file():
            raise ConfigError(f"unknown config {name_or_path!r}; bundled configs: {named_configs()} (or pass a .yaml path)")
        text = resource.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {name_or_path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path}: expected a mapping of settings, got {type(data).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = _parse_value(value)
    if data.get("amp") is False:  # YAML 1.1 reads a bare `off` as false
        data["amp"] = "off"
    try:
        config = _from_dict(TrainConfig, data)
    except TypeError as err:  # a section given as a scalar, e.g. --set optim=3
        raise ConfigError(f"malformed config: {err}") from None
    check_config(config)
    if config.data.max_depth <= config.data.min_depth or config.eval.max_depth <= config.eval.min_depth:
        raise ConfigError("data/eval max_depth must be larger than min_depth")
    config.model_config()  # fail now on a bad preset or model override
    return config


def _parse_value(text: str) -> Any:
    """YAML scalars, plus the numbers YAML 1.1 reads as strings (`3e-4`)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
