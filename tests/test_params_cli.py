"""`spd params` (issue 2)."""

import json
import subprocess
import sys


def test_params_json_inference_total_matches_plan():
    out = subprocess.run(
        [sys.executable, "-m", "spd.cli", "params", "--preset", "v15", "--json"], capture_output=True, text=True, check=True
    )
    table = json.loads(out.stdout)
    # The plan's 33,972K less the ~0.77 M ImageNet head its encoder figure includes.
    assert abs(table["inference_total"] - 33.2e6) / 33.2e6 < 0.05
    assert table["components"]["encoder"]["params"] == 27_864_960  # timm convnextv2_tiny, features_only
    assert 100_000 < table["training_only_total"] < 120_000
    for name, entry in table["components"].items():
        if entry["plan"] and abs(entry["params"] - entry["plan"]) / entry["plan"] > 0.10:
            assert entry.get("reason"), f"{name} is >10% off the plan without a reason"
