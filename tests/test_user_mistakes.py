"""Issue 25's user mistakes: labels in the wrong unit caught by `spd data check` and before step 1 of
`spd train`, a failed run that leaves nothing blocking its rerun, and `--resume` refused where it
cannot mean anything."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spd.data.synthetic import generate

SPD = [sys.executable, "-m", "spd.cli"]


@pytest.fixture(scope="module")
def millimetre_pngs(tmp_path_factory):
    """Synthetic rooms (millimetre PNG depth), described once rightly and once with depth_scale: 1."""
    root = generate(tmp_path_factory.mktemp("units"), n_train=6, n_test=2, size=(96, 128), holes=True, seed=2,
                    workers=1, progress=False)
    right = yaml.safe_load((root / "dense.yaml").read_text())
    assert right["depth_scale"] == 1000.0
    wrong = root / "metres.yaml"
    wrong.write_text(yaml.safe_dump({**right, "depth_scale": 1}))
    return root / "dense.yaml", wrong


def _run(*args, cwd=None):
    return subprocess.run(SPD + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def test_data_check_names_depth_scale_when_the_labels_are_millimetres_read_as_metres(millimetre_pngs):
    right, wrong = millimetre_pngs
    bad = _run("data", "check", "--dataset", wrong)
    assert bad.returncode == 1
    assert "depth_scale" in bad.stdout and "ERROR" in bad.stdout
    good = _run("data", "check", "--dataset", right)
    assert good.returncode == 0, good.stdout
    assert "labels [m]: median of medians" in good.stdout


def test_train_refuses_before_step_one_and_the_fixed_rerun_needs_no_overwrite(millimetre_pngs, tmp_path):
    right, wrong = millimetre_pngs
    run = tmp_path / "run"
    common = ["--config", "v15_tiny_synth", "--out", run, "--max-steps", "1", "--set", "data.workers=0",
              "--set", "eval.every_steps=0", "--set", "data.crop_size=[64, 96]", "--set", "eval.limit=1", "--set", "batch_size=2"]
    refused = _run("train", "--data-root", wrong, *common)
    assert refused.returncode == 3
    assert refused.stderr.strip().count("\n") == 0 and "depth_scale" in refused.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    fixed = _run("train", "--data-root", right, *common)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (run / "checkpoints" / "last").is_dir()


def test_resume_with_overwrite_and_resume_into_a_foreign_folder_are_refused(millimetre_pngs, tmp_path):
    right, _ = millimetre_pngs
    common = ["train", "--config", "v15_tiny_synth", "--data-root", right, "--max-steps", "1"]
    both = _run(*common, "--out", tmp_path / "run", "--resume", "--overwrite")
    assert both.returncode == 2 and "give one of them" in both.stderr
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    refused = _run(*common, "--out", foreign, "--resume")
    assert refused.returncode == 2 and "not a run folder" in refused.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_folder_free(synth_root, tmp_path, monkeypatch):
    """A failure after logging started (here: the first validation) clears the run's own files."""
    from spd.config.training import load_config
    from spd.engine import train as train_module
    from spd.engine.runlog import RunFolderGuard

    def broken_validation(session, state):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(train_module, "validate", broken_validation)
    cfg = load_config("v15_tiny_synth", ["data.workers=0", "data.crop_size=[64, 96]", "log_every=1"])
    cfg.max_steps = 1
    with pytest.raises(RuntimeError, match="validation failed"):
        train_module.train(cfg, synth_root, tmp_path / "run", progress=False)
    assert not RunFolderGuard._holds_run(tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


# --- issue 45: a new user's mistakes ---------------------------------------------------------------
FRAME = Path(__file__).parent / "fixtures" / "nyu_real" / "sync" / "rgb_00000.jpg"
DEPTH_PNG = Path(__file__).parent / "fixtures" / "nyu_real" / "sync" / "sync_depth_00000.png"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import warnings

    import spd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spd.save_model(spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=160),
                              tmp_path_factory.mktemp("tiny") / "model")


def _main(capsys, *args) -> tuple[int, list[str], str]:
    from spd.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def test_points_files_saved_by_spreadsheets_read_or_fail_in_one_line(tiny_folder, tmp_path, capsys):
    (tmp_path / "utf16.csv").write_bytes("u,v\r\n10,20\r\n30,40\r\n".encode("utf-16"))  # Excel's "Unicode Text"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfu,v\n10,20\n")  # Excel's "CSV UTF-8"
    for name, points in (("utf16.csv", 2), ("bom.csv", 1)):
        code, err, out = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points-file",
                               tmp_path / name)
        assert code == 0 and len(out.strip().splitlines()) == points, (name, err)
    (tmp_path / "latin1.csv").write_bytes("u,v # caméra\n10,20\n".encode("latin-1"))
    code, err, _ = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points-file",
                         tmp_path / "latin1.csv")
    assert code != 0 and len(err) == 1 and "latin1.csv" in err[0] and "save it as UTF-8" in err[0]


def test_output_paths_under_a_file_or_of_an_unwritable_kind_are_refused_before_work(tiny_folder, tmp_path, capsys):
    (tmp_path / "some_file").write_text("x")
    code, err, _ = _main(capsys, "export", "--model", tiny_folder, "--out", tmp_path / "some_file" / "sub")
    assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
    code, err, out = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points", "1,1",
                           "--out", tmp_path / "r.xlsx")
    assert code == 2 and len(err) == 1 and ".json or .csv" in err[0] and not out
    assert not (tmp_path / "r.xlsx").exists()


def test_a_depth_png_as_image_is_refused_not_answered(tiny_folder, capsys):
    code, err, out = _main(capsys, "predict", "--model", tiny_folder, "--image", DEPTH_PNG, "--points", "1,1")
    assert code != 0 and len(err) == 1 and "not an 8-bit colour photograph" in err[0] and "depth map" in err[0]
    assert "depth_m" not in out


def test_intrinsics_in_millimetres_are_warned_about(tiny_folder, capsys):
    code, err, out = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points", "320,240",
                           "--intrinsics", "3.6,3.6,320,240")
    assert code == 0 and "depth_m" in out  # the rule applied as asked, but never without a word
    assert len(err) == 1 and err[0].startswith("spd predict: warning:") and "millimetres" in err[0]
    code, err, _ = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points", "320,240",
                         "--intrinsics", "518.86,519.47,1325.58,253.74")
    assert len(err) == 1 and "principal point" in err[0]
    code, err, _ = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points", "320,240",
                         "--intrinsics", "518.86,519.47,325.58,253.74")
    assert err == []  # NYU's own camera: nothing to say


def test_ctrl_c_during_the_demo_then_the_printed_command_continues_it(tmp_path):
    """Issue 45: `spd demo` stopped by Ctrl-C prints a command that works, and it continues from the
    saved step (it used to be `--resume`, unrecognised, and a rerun deleted the run)."""
    import os
    import shlex
    import signal
    import time

    out = tmp_path / "demo"
    command = SPD + ["demo", "--out", str(out), "--n-train", "16", "--n-test", "2", "--size", "64x96",
                     "--max-steps", "40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count('"train"') < 1):
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    hint = next(line for line in stdout.splitlines() if "continue with: spd " in line)
    from spd.engine.checkpoint import load_training_state

    saved = load_training_state(out / "run" / "checkpoints" / "last")["progress"]["step"]
    again = shlex.split(hint.split("continue with: ", 1)[1])
    assert again[0] == "spd" and again[1] == "demo"
    result = subprocess.run(SPD + again[1:], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = next(line for line in result.stdout.splitlines() if line.startswith("resumed from"))
    assert saved > 0 and f"at step {saved}" in resumed
    assert (out / "metrics.json").is_file()


def test_a_model_says_what_it_was_trained_on_and_a_synthetic_one_warns(tmp_path, capsys, tiny_folder):
    """Issue 45: the model folder records its training sets; `spd predict` and /v1/info say so, and a
    model trained only on synthetic rooms warns that its metres mean nothing on a real photo."""
    import json

    rooms = generate(tmp_path / "rooms", n_train=8, n_test=2, size=(96, 128), seed=4, workers=1, progress=False)
    code, err, _ = _main(capsys, "train", "--config", "v15_tiny_synth", "--data-root", rooms, "--out", tmp_path / "run",
                         "--max-steps", "1", "--set", "batch_size=2", "--set", "eval.every_steps=0")
    assert code == 0, err
    model = tmp_path / "run" / "checkpoints" / "last"
    recorded = json.loads((model / "config.json").read_text())["trained_on"]
    assert recorded == [{"kind": "synthetic rooms", "frames": 8, "size": "128x96", "source": str(rooms)}]
    code, err, out = _main(capsys, "predict", "--model", model, "--image", FRAME, "--points", "1,1")
    assert code == 0 and "depth_m" in out
    assert [line for line in err if "synthetic rooms (8 frames, 128x96)" in line and "not meaningful" in line]
    code, err, _ = _main(capsys, "predict", "--model", tiny_folder, "--image", FRAME, "--points", "1,1")
    assert code == 0 and err == []  # unknown provenance (built in Python): nothing claimed

    import spd
    from fastapi.testclient import TestClient

    from spd.serve.app import create_app
    from spd.serve.cache import FeatureCache

    for folder, expected in ((model, "synthetic rooms (8 frames, 128x96)"), (tiny_folder, "unknown")):
        predictor = spd.Predictor.from_pretrained(folder)
        info = TestClient(create_app(predictor, "m", {}, FeatureCache(2**24, 60.0))).get("/v1/info").json()
        assert info["trained_on"].startswith(expected)
