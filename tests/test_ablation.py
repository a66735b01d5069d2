"""The plan's experiments (issue 30): the dense control on SPD's encoder, and `spd ablate`."""

import json
import warnings

import pytest
import torch

from spd.config.model import preset_config
from spd.models.dense_control import DenseControl, load_dense_control, save_dense_control
from spd.models.folder import CheckpointError

from conftest import random_queries


@pytest.fixture(scope="module")
def dense_control():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return DenseControl(preset_config("v15-tiny", image_long_side=130), warn_random_encoder=False)


def test_dense_control_answers_at_pixel_centres_of_its_full_resolution_map(dense_control):
    dense_control.eval()
    images = torch.randn(2, 3, 100, 130)  # not a multiple of 32: padded inside, cropped back
    with torch.no_grad():
        features = dense_control.encode(images)
        assert features.depth.shape == (2, 1, 100, 130) and bool((features.depth > 0).all())
        pixels = torch.tensor([[[0.0, 0.0], [129.0, 99.0], [57.0, 31.0]]]).expand(2, 3, 2)
        depth = dense_control.decode(features, pixels)
    # A query at a pixel centre reads that pixel of the map exactly (DESIGN §2's convention).
    expected = torch.stack([features.depth[:, 0, 0, 0], features.depth[:, 0, 99, 129], features.depth[:, 0, 31, 57]], 1)
    torch.testing.assert_close(depth, expected, rtol=1e-6, atol=0)
    with torch.no_grad():  # the folded encoder of inference against timm's forward
        reference = DenseControl(dense_control.config, warn_random_encoder=False)
        reference.load_state_dict(dense_control.state_dict())
        reference.config = preset_config("v15-tiny", image_long_side=130, encoder_fast=False)
        torch.testing.assert_close(reference.eval().encode(images).depth, features.depth, rtol=1e-4, atol=0)


def test_dense_control_trains_every_parameter_and_round_trips_its_folder(dense_control, tmp_path):
    from spd.cli.models import load_any_model

    dense_control.train()
    images, queries = torch.randn(2, 3, 64, 96), random_queries(2, 5, 64, 96)
    out = dense_control(images, queries, return_aux=True)
    assert out["depth"].shape == (2, 5) and out["dense_depth"].shape == (2, 1, 64, 96)
    (out["depth"].log().sum() + out["dense_depth"].log().mean()).backward()
    assert [n for n, p in dense_control.named_parameters() if p.grad is None] == []  # DDP waits for none
    dense_control.zero_grad(set_to_none=True)
    save_dense_control(dense_control, tmp_path / "dense")
    loaded = load_any_model(str(tmp_path / "dense"), "cpu")  # `--model FOLDER` of every command
    assert isinstance(loaded, DenseControl) and loaded.config == dense_control.config
    dense_control.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, queries), dense_control(images, queries), rtol=0, atol=0)
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="checksum|sha256|SHA-256"):
        load_dense_control(tmp_path / "dense")


def test_ablate_trains_evaluates_times_and_skips_what_is_done(synth_root, tmp_path, capsys):
    """The `make test` smoke: two variants and the dense control, a few steps each; a second run
    trains nothing and evaluates nothing again."""
    from spd.cli.main import main

    out = tmp_path / "study"
    args = ["ablate", "--config", "v15_tiny_synth", "--data-root", str(synth_root), "--out", str(out),
            "--variants", "v15", "no-ldrm", "dense-control", "--max-steps", "2", "--repeat", "2",
            "--set", "batch_size=2", "--set", "eval.every_steps=0", "--set", "data.num_queries=8"]
    assert main(args) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["v15", "no-ldrm", "dense-control"]
    for row in report["rows"]:
        assert row["eval_k"] == 256 and row["steps"] == 2 and row["total_ms"] > 0
        assert 0 < row["metrics"]["abs_rel"] < 10 and 0 <= row["metrics"]["delta1"] <= 1
    params = {row["variant"]: row["parameters"] for row in report["rows"]}
    assert params["no-ldrm"] < params["v15"]  # LDRM's weights are gone, the training-only heads never count
    table = (out / "ablation.md").read_text()
    assert "| dense-control |" in table and (out / "ablation.png").stat().st_size > 0
    evals = {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    weights = (out / "runs" / "v15" / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("trained already") == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()} == evals
    assert (out / "runs" / "v15" / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns == weights


def test_ablate_prints_one_resumable_training_command_per_variant(capsys):
    from spd.cli.main import main

    assert main(["ablate", "--config", "v15_tiny_synth", "--data-root", "d", "--out", "o", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all(line.startswith("spd train --config v15_tiny_synth") for line in lines)
    assert "--out o/runs/k128 --resume --set data.num_queries=128" in lines[5]
    assert main(["ablate", "--config", "v15_tiny_synth", "--data-root", "d", "--out", "o", "--variants", "v16"]) != 0
    assert "unknown ablation variants ['v16']" in capsys.readouterr().err
