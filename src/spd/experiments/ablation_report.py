"""The ablation study's outputs: `ablation.json` (every figure and how it was obtained),
`ablation.md` (the table) and `ablation.png` (abs_rel against total(K) time)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from spd.bench.machine import cpu_facts

COLUMNS = ("variant", "change", "train K", "eval K", "params (M)", "abs_rel", "δ1", "RMSE (m)", "total(K) ms")


def table_rows(rows: list[dict]) -> list[str]:
    """Markdown table lines, one per (variant, eval K)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['variant']} | {row['change']} | {row['train_k']} | {row['eval_k']} | {row['parameters'] / 1e6:.2f} "
            f"| {m['abs_rel']:.4f} | {m['delta1']:.4f} | {m['rmse']:.4f} | {row['total_ms']:.1f} |"
        )
    return lines


def save_plot(path: Path, rows: list[dict], k: int) -> Path:
    """abs_rel (lower is better) against total(K) ms, one labelled point per variant at eval K = k."""
    from spd.vis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    for row in (r for r in rows if r["eval_k"] == k):
        ax.scatter(row["total_ms"], row["metrics"]["abs_rel"], s=36)
        ax.annotate(row["variant"], (row["total_ms"], row["metrics"]["abs_rel"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xlabel(f"total({k}) ms: encode + decode {k} points, one image")
    ax.set_ylabel("abs_rel (sparse protocol, lower is better)")
    ax.set_title("ablation: accuracy against time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[dict], config: str, data_root: str, sets: list[str], max_steps) -> dict:
    """Writes the three files into `out` and returns what `ablation.json` holds."""
    out.mkdir(parents=True, exist_ok=True)
    import torch

    report = {
        "command": shlex.join(["spd", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("spd", "__main__.py") else None,
        "config": config, "data_root": data_root, "sets": sets, "max_steps": max_steps,
        "machine": cpu_facts()["model"], "cpu": cpu_facts(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "rows": rows,
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    ks = sorted({row["eval_k"] for row in rows})
    plot_k = 256 if 256 in ks else ks[-1]
    save_plot(out / "ablation.png", rows, plot_k)
    timed = rows[0]["timed_at"]
    steps = max_steps or "the config's"
    extra = " with " + ", ".join(f"`{s}`" for s in sets) if sets else ""
    text = [
        "# Ablation", "",
        f"Config `{config}`{extra}, data `{data_root}`, {steps} steps per variant. Sparse protocol on the test split (final weights); "
        f"total(K): encode + decode K points of one {timed[0]}x{timed[1]} image, fp32, median of round-robin "
        f"runs on {report['machine']} ({', '.join(report['cpu']['isa_flags'])}; {report['threads']} threads), "
        "all variants in one process.", "",
        *table_rows(rows), "", f"![abs_rel against total({plot_k}) ms](ablation.png)", "",
    ]
    if report["command"]:
        text[2:2] = [f"Made by `{report['command']}`.", ""]
    (out / "ablation.md").write_text("\n".join(text))
    return report
