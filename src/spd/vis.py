"""Figures a person can read: points coloured by depth with a colour bar, curves, scatter plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_point_overlay(
    path: str | Path,
    rgb: np.ndarray,
    points: np.ndarray,
    depth: np.ndarray,
    true_depth_map: np.ndarray | None = None,
    title: str = "SPD depth at the queried points",
) -> Path:
    """The image with each point drawn as a dot coloured by its depth [m] and a labelled colour bar;
    with `true_depth_map`, the ground-truth depth map beside it on the same colour scale."""
    plt = _pyplot()
    panels = 2 if true_depth_map is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 5.4), squeeze=False)
    finite = depth[np.isfinite(depth)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if true_depth_map is not None:
        valid = true_depth_map[true_depth_map > 0]
        if valid.size:
            vmin, vmax = min(vmin, float(valid.min())), max(vmax, float(valid.max()))
    ax = axes[0, 0]
    ax.imshow(rgb)
    scatter = ax.scatter(points[:, 0], points[:, 1], c=depth, cmap="turbo", vmin=vmin, vmax=vmax, s=28,
                         edgecolors="white", linewidths=0.6)
    ax.set_title(f"{title} ({len(points)} points)")
    ax.set_axis_off()
    if true_depth_map is not None:
        shown = np.where(true_depth_map > 0, true_depth_map, np.nan)
        axes[0, 1].imshow(shown, cmap="turbo", vmin=vmin, vmax=vmax)
        axes[0, 1].set_title("ground-truth depth (holes blank)")
        axes[0, 1].set_axis_off()
    bar = fig.colorbar(scatter, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("depth [m]")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_scatter(path: str | Path, true_depth: np.ndarray, predicted: np.ndarray, title: str) -> Path:
    """Predicted vs true depth [m] with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(true_depth, predicted, s=3, alpha=0.3)
    top = float(max(true_depth.max(), predicted.max())) * 1.05
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="perfect")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true depth [m]")
    ax.set_ylabel("predicted depth [m]")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_training_curves(path: str | Path, metrics_jsonl: str | Path, median_abs_rel: float | None = None) -> Path:
    """Training loss per step and validation abs_rel from a run's metrics.jsonl."""
    import json

    plt = _pyplot()
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss_total"] for r in train], label="total")
    left.plot([r["step"] for r in train], [r["loss_sparse"] for r in train], label="sparse SILog")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("training loss")
    left.legend()
    right.plot([r["step"] for r in val], [r["abs_rel"] for r in val], "o-", label="model")
    if median_abs_rel is not None:
        right.axhline(median_abs_rel, color="gray", linestyle="--", label="median-depth predictor")
    right.set_xlabel("step")
    right.set_ylabel("abs_rel (lower is better)")
    right.set_title("validation abs_rel (sparse protocol)")
    right.set_ylim(bottom=0)
    right.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
