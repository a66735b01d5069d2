"""`spd params`: per-component parameter counts beside the research plan's §9 table."""

from __future__ import annotations

from torch import nn

from spd.models.spd import SPD

# The plan's §9 columns, in parameters. Its "MSDA" and "B3b" rows already include each layer's
# canvas sublayer (its §6.2/§6.3 per-layer tables), and its totals add the "Triple canvas" row
# again; we show that row for comparison but never add it twice.
PLAN_COLUMNS: dict[str, dict[str, int]] = {
    "v15": {"encoder": 28_600_000, "neck": 56_000, "l4_self_attn": 0, "precompute": 812_000, "seed": 160_000,
            "msda_layers": 2_274_000, "global_layers": 964_000, "ldrm": 203_000, "depth_head": 87_000},
    "v14": {"encoder": 28_600_000, "neck": 278_000, "l4_self_attn": 886_000, "precompute": 148_000, "seed": 160_000,
            "msda_layers": 2_055_000, "global_layers": 1_334_000, "ldrm": 0, "depth_head": 74_000},
}
PLAN_PARAMS = PLAN_COLUMNS["v15"]
PLAN_CANVAS = 816_000
PLAN_INFERENCE_TOTALS = {"v15": 33_972_000, "v14": 34_351_000}
PLAN_INFERENCE_TOTAL = PLAN_INFERENCE_TOTALS["v15"]
PLAN_TRAINING_ONLY = 111_000
# timm's ConvNeXt V2-T classifier (head norm + Linear(768 -> 1000)): inside the plan's 28.6 M encoder
# row and its totals, not in a features_only encoder.
CLASSIFIER_HEAD = 2 * 768 + 768 * 1000 + 1000

REASONS: dict[str, str] = {
    "encoder": "the plan's 28.6 M is timm's full classifier; features_only drops the 0.77 M ImageNet head",
    "ldrm": "DESIGN.md's residual branch is Conv1x1(192->96) (18 K); the plan's table counts 96->96 (9 K)",
    "global_layers": "the plan's B3b row omits each layer's output projection Linear(d->d) (37 K per layer)",
}


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_table(model: SPD, column: str = "v15") -> dict:
    """Counts per plan component beside the plan's `column` ("v15" or "v14"). Returns the JSON dict of
    `spd params --json`."""
    plan_params = PLAN_COLUMNS[column]
    counts = {
        "encoder": count(model.encoder),
        "neck": count(model.neck),
        "l4_self_attn": count(model.l4_self_attn),
        "precompute": count(model.coarse_proj) + count(model.global_kv),  # the plan's one pre-compute row
        "seed": count(model.seed),
        "msda_layers": count(model.msda_layers),
        "global_layers": count(model.global_layers),
        "ldrm": count(model.ldrm),
        "depth_head": count(model.head),
    }
    components = {}
    for name, params in counts.items():
        plan = plan_params[name]
        entry = {"params": params, "plan": plan}
        off = abs(params - plan) / plan if plan else (0.0 if params == 0 else float("inf"))
        if off > 0.10:
            entry["reason"] = REASONS.get(name, f"ablation setting differs from the {column} plan")
        elif name in REASONS and off > 0.0:
            entry["note"] = REASONS[name]
        components[name] = entry
    canvas = sum(count(layer.canvas) for layer in [*model.msda_layers, *model.global_layers])
    training_only = sum(count(getattr(model, name)) for name in SPD.TRAINING_ONLY_MODULES)
    return {
        "components": components,
        "canvas_inside_layers": {"params": canvas, "plan": PLAN_CANVAS},
        "plan_column": column,
        "inference_total": sum(counts.values()),
        "plan_inference_total": PLAN_INFERENCE_TOTALS[column],
        "plan_inference_total_less_classifier": PLAN_INFERENCE_TOTALS[column] - CLASSIFIER_HEAD,
        "training_only_total": training_only,
        "plan_training_only_total": PLAN_TRAINING_ONLY,
    }


def format_table(table: dict) -> str:
    lines = [f"{'component':<16}{'params':>14}{'plan ' + table['plan_column']:>14}{'diff':>9}  note"]
    for name, entry in table["components"].items():
        params, plan = entry["params"], entry["plan"]
        diff = f"{100 * (params - plan) / plan:+.1f}%" if plan else "-"
        note = entry.get("reason", entry.get("note", ""))
        lines.append(f"{name:<16}{params:>14,}{plan:>14,}{diff:>9}  {note}")
    canvas = table["canvas_inside_layers"]
    lines.append(
        f"{'(canvas)':<16}{canvas['params']:>14,}{canvas['plan']:>14,}{'':>9}  "
        "inside msda/global rows; the plan's total counts it a second time"
    )
    total, plan_total = table["inference_total"], table["plan_inference_total_less_classifier"]
    lines.append(f"{'inference total':<16}{total:>14,}{table['plan_inference_total']:>14,}")
    lines.append(f"{'  less head':<16}{'':>14}{plan_total:>14,}{100 * (total - plan_total) / plan_total:>+8.1f}%  "
                 "the plan's total less timm's ImageNet classifier head")
    lines.append(
        f"{'training-only':<16}{table['training_only_total']:>14,}{table['plan_training_only_total']:>14,}"
        "  canvas head + LDRM dense head"
    )
    return "\n".join(lines)
