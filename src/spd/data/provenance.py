"""What a model was trained on, recorded in its folder and said where it answers (issue 45).

`spd train` writes `trained_on` into the model's config: one entry per training set,
{"kind", "frames", "size" (WxH), "source"}, the kind told from the set itself:
- "synthetic rooms": a folder `spd synth` wrote (its `synth.json` marker), or a description in one;
- "pseudo-labels of <teacher>": an `spd distill label` folder (its `manifest.json`);
- "NYU Depth V2": any other BTS-layout folder;
- "own data": any other dataset description.
A model trained only on synthetic rooms answers metres that mean nothing on real photographs: its
predictors say so (`synthetic_only`).
"""

from __future__ import annotations

import json
from pathlib import Path

SYNTH_MARKER = "synth.json"  # written by `spd synth` into its output folder
DISTILL_MANIFEST = "manifest.json"


def _kind(source: Path, part) -> str:
    folder = part.description.root if hasattr(part, "description") else source
    if (folder / SYNTH_MARKER).is_file():
        return "synthetic rooms"
    manifest = folder / DISTILL_MANIFEST
    if hasattr(part, "description") and manifest.is_file():
        try:
            teacher = json.loads(manifest.read_text())["teacher"]
            return f"pseudo-labels of {teacher['kind']} teacher {teacher['path']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return "own data" if hasattr(part, "description") else "NYU Depth V2"


def describe_training_data(parts: list, sources: list[str]) -> list[dict]:
    """One entry per training set (a `DepthDataset` and the root or description it came from)."""
    sets = []
    for part, source in zip(parts, sources):
        height, width = part.load(0)[0].shape[:2]
        sets.append({"kind": _kind(Path(source), part), "frames": len(part), "size": f"{width}x{height}",
                     "source": source})
    return sets


def summary(trained_on: list[dict] | None) -> str:
    """'synthetic rooms (1000 frames, 160x120)', several joined by '; ', or 'unknown'."""
    if not trained_on:
        return "unknown (the model folder does not record it)"
    return "; ".join(f"{entry['kind']} ({entry['frames']} frames, {entry['size']})" if "frames" in entry
                     else f"{entry['kind']} {entry['source']}" for entry in trained_on)


def synthetic_only(trained_on: list[dict] | None) -> bool:
    return bool(trained_on) and all(entry["kind"] == "synthetic rooms" for entry in trained_on
                                    if entry["kind"] != "fine-tuned from")
