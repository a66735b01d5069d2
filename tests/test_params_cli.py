"""`spd params` (issue 2; the v14 preset, issue 30)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("preset, plan_total", [("v15", 33_972_000), ("v14", 34_351_000)])
def test_params_json_inference_total_matches_plan(preset, plan_total):
    out = subprocess.run(
        [sys.executable, "-m", "spd.cli", "params", "--preset", preset, "--json"], capture_output=True, text=True, check=True
    )
    table = json.loads(out.stdout)
    assert table["plan_column"] == preset and table["plan_inference_total"] == plan_total
    # The plan's total less the ~0.77 M ImageNet head its encoder figure includes: within 3 %.
    less_head = table["plan_inference_total_less_classifier"]
    assert 32.8e6 < less_head < 33.6e6 and abs(table["inference_total"] - less_head) / less_head < 0.03
    assert table["components"]["encoder"]["params"] == 27_864_960  # timm convnextv2_tiny, features_only
    assert 100_000 < table["training_only_total"] < 120_000
    for name, entry in table["components"].items():
        if entry["plan"] and abs(entry["params"] - entry["plan"]) / entry["plan"] > 0.10:
            assert entry.get("reason"), f"{name} is >10% off the plan without a reason"
