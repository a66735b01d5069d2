"""Right on every CPU (issue 26): the predictor (fp32 and bf16), `spd eval --dtype bf16` and a short
`spd bench` under limited instruction sets give the default run's depths and never crash.

`ONEDNN_MAX_CPU_ISA` caps oneDNN (AVX2: no bf16 inner product, as on most laptops and AMD Zen 2/3;
SSE41: older still); `ATEN_CPU_CAPABILITY` caps PyTorch's own vectorised kernels. Each setting runs in
its own process: both are read once, when the library loads. On a machine that is already below a
cap the setting changes nothing and the comparison still holds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spd

FRAMES = [Path(__file__).parent / "fixtures" / "nyu_real" / "sync" / f"rgb_{i:05d}.jpg" for i in (0, 50)]
POINTS = [[10.0, 12.0], [159.5, 119.5], [320.0, 240.0], [479.5, 359.5], [630.0, 470.0], [5.0, 400.0]]

PREDICT = """
import json, sys, warnings
import spd
warnings.simplefilter("ignore")  # the one routing warning of an AVX2 cap is expected here
model = spd.load_model(sys.argv[1])
out = {}
for dtype in sys.argv[3].split(","):
    predictor = spd.Predictor(model, dtype=dtype)
    out[dtype] = [predictor.predict(frame, json.loads(sys.argv[2])).tolist() for frame in sys.argv[4:]]
print(json.dumps(out))
"""

SETTINGS = {  # name -> (environment, dtypes compared)
    "onednn_avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "fp32,bf16"),
    "onednn_sse41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, "fp32,bf16"),
    "aten_avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, "fp32"),
    "aten_default": ({"ATEN_CPU_CAPABILITY": "default"}, "fp32"),
}


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    return {**env, **extra}


def _predict(model_dir: Path, extra_env: dict, dtypes: str) -> dict:
    argv = [sys.executable, "-c", PREDICT, str(model_dir), json.dumps(POINTS), dtypes, *map(str, FRAMES)]
    result = subprocess.run(argv, env=_env(extra_env), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return {k: np.array(v) for k, v in json.loads(result.stdout).items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("isa") / "model"
    spd.save_model(tiny_model, folder)
    return folder


@pytest.fixture(scope="module")
def default_depths(model_dir):
    return _predict(model_dir, {}, "fp32,bf16")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_predictor_gives_the_default_depths_under_a_limited_instruction_set(model_dir, default_depths, setting):
    extra_env, dtypes = SETTINGS[setting]
    depths = _predict(model_dir, extra_env, dtypes)
    np.testing.assert_allclose(depths["fp32"], default_depths["fp32"], rtol=1e-4)
    if "bf16" in depths:
        assert np.isfinite(depths["bf16"]).all()
        relative = np.abs(depths["bf16"] - default_depths["bf16"]) / default_depths["bf16"]
        assert relative.mean() <= 0.01, relative.mean()


@pytest.mark.parametrize("isa", ["AVX2"])  # SSE41 takes the same F.linear path: its predictor test above suffices
def test_bf16_eval_and_a_short_bench_run_under_a_capped_onednn(model_dir, synth_root, tmp_path, isa):
    env = _env({"ONEDNN_MAX_CPU_ISA": isa})
    spd_cli = [sys.executable, "-m", "spd.cli"]
    evaluated = subprocess.run(spd_cli + ["eval", "--model", str(model_dir), "--data-root", str(synth_root), "--dtype",
                                          "bf16", "--crop", "none", "--limit", "2", "--k", "32"],
                               env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "abs_rel" in evaluated.stdout
    benched = subprocess.run(spd_cli + ["bench", "--height", "64", "--width", "96", "--k", "16", "--dtype", "fp32,bf16",
                                        "--no-train-step", "--repeat", "1", "--json", str(tmp_path / "bench.json")],
                             env=env, capture_output=True, text=True)
    assert benched.returncode == 0, benched.stderr[-2000:]
    assert "error" not in benched.stderr.lower()
    kernels = json.loads((tmp_path / "bench.json").read_text())["kernels"]
    assert kernels["linear"]["bf16"] == "F.linear"  # oneDNN capped below AVX-512 has no bf16 inner product


def _cli_predict(model_dir: Path, extra_env: dict, out: Path) -> tuple[np.ndarray, str]:
    points = ";".join(f"{u},{v}" for u, v in POINTS)
    argv = [sys.executable, "-m", "spd.cli", "predict", "--model", str(model_dir), "--image", str(FRAMES[0]),
            "--points", points, "--dtype", "bf16", "--out", str(out)]
    result = subprocess.run(argv, env=_env(extra_env), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.array([p["depth_m"] for p in json.loads(out.read_text())["points"]]), result.stderr


def test_spd_predict_bf16_under_avx2_matches_the_default_run_and_says_why_in_one_line(model_dir, tmp_path):
    """The issue's own check as a user runs it: `spd predict --dtype bf16` on a real NYU frame with
    oneDNN capped at AVX2 exits 0, within 1 % of the default run, and the routing's one warning is
    one line naming the command (no file:line, no source line)."""
    default, _ = _cli_predict(model_dir, {}, tmp_path / "default.json")
    capped, stderr = _cli_predict(model_dir, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, tmp_path / "avx2.json")
    assert np.abs(capped - default).mean() / default.mean() <= 0.01
    lines = [line for line in stderr.splitlines() if "linear layers run F.linear" in line]
    assert len(lines) == 1 and lines[0].startswith("spd predict: warning: torch.bfloat16 linear layers"), stderr
    assert "onednn.py" not in stderr
