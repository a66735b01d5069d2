"""Bad input fails well (issue 12): every sub-command, driven through the CLI with mistakes a user
makes, ends in a non-zero exit, no traceback, a message of at most three lines naming the problem,
and no output file created or changed."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spd
from spd.cli import main
from spd.models.spd import save_model

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"
IMAGE = str(FIXTURES / "sync" / "rgb_00000.jpg")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = spd.build_model("v15-tiny", warn_random_encoder=False)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("bad")
    (root / "points_bad.csv").write_text("u,v\n10,20\n30\n")
    (root / "corrupt.jpg").write_text("not an image")
    tampered = root / "tampered"
    shutil.copytree(model_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF  # one byte of a tensor: the file still parses, the checksum does not match
    (tampered / "model.safetensors").write_bytes(bytes(data))
    no_config = root / "no_config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    (root / "used_run").mkdir()
    (root / "used_run" / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    return root


def _cases(model: str, root: Path, synth: Path) -> list[tuple[list[str], str]]:
    """(arguments, a word the message must contain)."""
    predict = ["predict", "--model", model, "--image", IMAGE]
    train = ["train", "--config", "v15_tiny_synth", "--data-root", str(synth), "--out", str(root / "run")]
    evaluate = ["eval", "--model", model, "--data-root", str(synth), "--crop", "none"]
    cases = [
        (predict + ["--points", ""], "no points"),
        (predict + ["--points", "1,2;3"], "u,v"),
        (predict + ["--points", "a,b"], "u,v"),
        (predict + ["--points", "10,20;700,30"], "point 1"),
        (predict + ["--points", "nan,3"], "point 0"),
        (predict + ["--grid", "0"], "positive integer"),
        (predict + ["--grid", "-3"], "positive integer"),
        (predict + ["--points-file", str(root / "missing.csv")], "missing.csv"),
        (predict + ["--points-file", str(root / "points_bad.csv")], "line 3"),
        (predict + ["--points", "1,1", "--intrinsics", "1,2,3"], "fx,fy,cx,cy"),
        (predict + ["--points", "1,1", "--intrinsics=-5,5,3,3"], "fx, fy > 0"),
        (predict + ["--points", "1,1", "--intrinsics", str(root / "K.npy")], "not found"),
        (predict[:-1] + [str(root / "missing.jpg"), "--points", "1,1"], "missing.jpg"),
        (predict[:-1] + [str(root / "corrupt.jpg"), "--points", "1,1"], "corrupt.jpg"),
        (["predict", "--model", str(root / "nowhere"), "--image", IMAGE, "--points", "1,1"], "not found"),
        (["predict", "--model", str(root / "tampered"), "--image", IMAGE, "--points", "1,1"], "checksum"),
        (["predict", "--model", f"baseline:{model}", "--image", IMAGE, "--points", "1,1"], "not Depth Anything"),
        (["predict", "--model", "median:abc", "--image", IMAGE, "--points", "1,1"], "median"),
        (predict + ["--points", "1,1", "--device", "tpu"], "device"),
        (predict + ["--points", "1,1", "--max-side", "-1"], "integer"),
        (evaluate[:2] + [str(root / "no_config")] + evaluate[3:], "config.json"),
        (evaluate[:4] + [str(root / "no_data")] + evaluate[5:], "no_data"),
        (evaluate + ["--k", "0"], "positive integer"),
        (evaluate + ["--limit", "0"], "positive integer"),
        (train + ["--set", "batch_size=0"], "batch_size"),
        (train + ["--set", "optim.lr=abc"], "optim.lr"),
        (train + ["--set", "optim.schedule=cosin"], "cosine"),
        (train + ["--set", "amp=bf61"], "amp"),
        (train + ["--set", "no_such_key=1"], "no_such_key"),
        (train + ["--set", "data.crop_size=[100,100]"], "multiples of 32"),
        (train + ["--set", "data.zoom=0.5"], "data.zoom"),
        (train + ["--max-steps", "0"], "positive integer"),
        (["train", "--config", "no_such_config", "--data-root", str(synth), "--out", str(root / "run")], "no_such_config"),
        (train[:4] + [str(root / "no_data")] + train[5:], "no_data"),
        (train[:-1] + [str(root / "used_run")], "--resume"),
        (["synth", "--out", str(root / "synth"), "--n-train", "0", "--n-test", "1"], "positive integer"),
        (["synth", "--out", str(root / "synth"), "--n-train", "2", "--n-test", "1", "--size", "10x10"], "32x32"),
        (["synth", "--out", str(root / "synth"), "--n-train", "1", "--n-test", "1", "--intrinsics", "1,2,3"], "fx,fy,cx,cy"),
        (["bench", "--k", "0,5"], "positive integers"),
        (["bench", "--repeat", "0"], "positive integer"),
        (["params", "--preset", "v99"], "v99"),
        (["data", "check", "--root", str(root / "no_data"), "--filelist", str(root / "no_list.txt")], "no_list.txt"),
        (["demo", "--out", str(root / "demo"), "--n-train", "0"], "positive integer"),
    ]
    if not torch.cuda.is_available():
        cases.append((predict + ["--points", "1,1", "--device", "cuda"], "CUDA"))
    return cases


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_at_least_thirty_bad_inputs_fail_in_one_line(files, model_dir, synth_root, capsys):
    cases = _cases(str(model_dir), files, synth_root)
    assert len(cases) >= 30
    before = _snapshot(files), _snapshot(synth_root)
    for args, word in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(args)
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code not in (0, None), f"{args}: exit {code}"
        assert "Traceback" not in err, f"{args}: {err}"
        assert 1 <= len(lines) <= 3, f"{args}: {err}"
        assert word in err, f"{args}: {word!r} not in {err!r}"
    assert (_snapshot(files), _snapshot(synth_root)) == before, "a failing command created or changed a file"


def test_a_real_process_prints_one_line_and_the_documented_exit_code(model_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(data))
    command = [sys.executable, "-m", "spd.cli", "predict", "--model", str(tampered), "--image", IMAGE, "--points", "1,1"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 4  # EXIT_CHECKPOINT
    assert result.stderr.strip().startswith("spd predict: error: ")
    assert "checksum" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert "Traceback" in debug.stderr  # --debug shows where


def test_a_second_writer_and_a_changed_resume_are_refused(tmp_path, synth_root):
    from spd.engine.runlog import RunFolderGuard
    from spd.errors import RunFolderError
    from spd.config.training import load_config

    cfg = load_config("v15_tiny_synth")
    run = tmp_path / "run"
    guard = RunFolderGuard(run, cfg.to_dict(), resume=False, overwrite=False)
    try:
        with pytest.raises(RunFolderError, match="in use by another training process"):
            RunFolderGuard(run, cfg.to_dict(), resume=False, overwrite=False)
    finally:
        guard.release()
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 3, "kind": "train"}\n')
    changed = load_config("v15_tiny_synth", ["batch_size=3"])
    with pytest.raises(RunFolderError, match="batch_size"):
        RunFolderGuard(run, changed.to_dict(), resume=True, overwrite=False)
    safe = load_config("v15_tiny_synth", ["max_steps=7"])
    RunFolderGuard(run, safe.to_dict(), resume=True, overwrite=False).release()  # a safe change is accepted


def test_a_full_disk_leaves_last_loadable_and_no_temporary_folder(tmp_path, model_dir):
    from spd.engine.checkpoint import load_training_state, save_checkpoint
    from spd.models.folder import CheckpointError

    mount = tmp_path / "small"
    mount.mkdir()
    size = 3 * (model_dir / "model.safetensors").stat().st_size // 2 + 4096 * 64
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip() or 'not permitted'})")
    try:
        model = spd.load_model(model_dir)
        save_checkpoint(mount / "last", model, {"progress": {"step": 1}})
        with pytest.raises(CheckpointError, match="previous one is intact"):
            save_checkpoint(mount / "last", model, {"progress": {"step": 2}})
        assert sorted(p.name for p in mount.iterdir()) == ["last"]
        assert load_training_state(mount / "last")["progress"]["step"] == 1
        spd.load_model(mount / "last")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_exif_rotated_and_huge_images_give_the_depths_of_the_upright_small_one(model_dir, tmp_path):
    predictor = spd.Predictor.from_pretrained(model_dir)
    upright = Image.open(IMAGE)
    points = np.array([[100.0, 80.0], [320.0, 240.0], [500.5, 400.0], [630.0, 20.0]])
    reference = predictor.predict(upright, points)
    # Stored rotated, with the EXIF tag (6: rotate 270 to view) that makes a viewer show it upright.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    rotated = predictor.predict(str(tmp_path / "rotated.jpg"), points)
    np.testing.assert_allclose(rotated, reference, rtol=0.03)  # only JPEG re-encoding differs
    big = upright.resize((4000, 3000), Image.Resampling.BICUBIC)
    scale = np.array([4000 / 640, 3000 / 480])
    huge = predictor.predict(big, (points + 0.5) * scale - 0.5)  # the same scene points
    np.testing.assert_allclose(huge, reference, rtol=0.03)  # within resampling of the resize


# --- issue 25: the last tracebacks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, synth_root, export_160):
    """Files for the mistakes of issue 25: Latin-1 text files, a decompression bomb, a broken YAML
    config, a run folder with a corrupted config.yaml, an export with a wrongly typed manifest field."""
    import json

    from spd.data.synthetic import generate

    root = tmp_path_factory.mktemp("mistakes")
    (root / "latin1_list.txt").write_bytes("sync/rgb_\xe9t\xe9.jpg sync/d.png 518.8\n".encode("latin-1"))
    own = generate(root / "own", n_train=2, n_test=1, size=(64, 96), holes=False, seed=1, workers=1, progress=False,
                   sparse=20)
    first_label = (own / "sparse.yaml").parent / next(
        line.split()[1] for line in (own / "sparse_train.txt").read_text().splitlines() if line.strip())
    first_label.write_bytes(b"u,v,depth_m\n1,1,2.0\n# caf\xe9\n")
    Image.new("1", (14000, 14000)).save(root / "bomb.png")  # 196 M pixels: over PIL's decompression-bomb limit
    (root / "broken.yaml").write_text("optim: [lr: 3e-4\n")
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("calibration images go here\n")
    run = root / "corrupt_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    (run / "config.yaml").write_text("batch_size: [\n")
    (root / "a_file").write_text("not a folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=96)
    save_model(model, root / "model96")
    shutil.copytree(export_160[1], root / "onnx")  # an export of this session (the ctrl-C test re-exports over it)
    bad = root / "bad_manifest"
    shutil.copytree(root / "onnx", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "height": "72"}))
    return root, own


def _mistake_cases(root: Path, own: Path, synth: Path, model: str) -> list[tuple[list[str], int, str]]:
    """(arguments, documented exit code, a word the one line must contain)."""
    predict = ["predict", "--model", model, "--image", IMAGE, "--points", "1,1"]
    train = ["train", "--config", "v15_tiny_synth", "--out", str(root / "run"), "--max-steps", "1"]
    return [
        (["data", "check", "--root", str(synth), "--filelist", str(root / "latin1_list.txt")], 1, "UTF-8"),
        (["eval", "--model", model, "--data-root", str(synth), "--filelist", str(root / "latin1_list.txt")], 3, "UTF-8"),
        (train + ["--data-root", str(own / "sparse.yaml"), "--set", "data.workers=0"], 3, "UTF-8"),
        (["predict", "--model", model, "--image", str(root / "bomb.png"), "--points", "1,1"], 3, "too large"),
        (predict + ["--out", str(root / "no_such_dir" / "depth.json")], 2, "does not exist"),
        (predict + ["--vis", str(root / "no_such_dir" / "overlay.png")], 2, "does not exist"),
        (["train", "--config", str(root / "broken.yaml"), "--data-root", str(synth), "--out", str(root / "run")], 2,
         "not valid YAML"),
        (["train", "--config", "v15_tiny_synth", "--data-root", str(synth), "--out", str(root / "corrupt_run"),
          "--resume"], 2, "corrupted"),
        (["serve", "--model", model, "--port", "70000"], 2, "65535"),
        (["serve", "--model", model, "--backend", "onnx", "--compile"], 2, "drop it with --backend onnx"),
        (["predict", "--backend", "onnx", "--model", str(root / "bad_manifest"), "--image", IMAGE, "--points", "1,1"], 4,
         "'height'"),
        (["export", "--model", str(root / "model96"), "--out", str(root / "a_file")], 2, "is a file"),
        (["export", "--model", str(root / "model96"), "--out", str(root / "int8"), "--int8"], 2, "--calibration"),
        (["export", "--model", str(root / "model96"), "--out", str(root / "int8"), "--calibration", str(synth)], 2,
         "only for --int8"),
        (["export", "--model", str(root / "model96"), "--out", str(root / "int8"), "--int8", "--calibration",
          str(root / "no_such_dir")], 2, "not a folder"),
        (["export", "--model", str(root / "model96"), "--out", str(root / "int8"), "--int8", "--calibration",
          str(root / "no_images")], 2, "no .jpg"),
        (["eval", "--model", model, "--data-root", str(synth), "--min-depth", "20", "--max-depth", "10"], 2,
         "--min-depth"),
        (predict[:-2] + ["--grid", "100000"], 2, "--grid 100000"),
    ]


def _exit_code_of(args: list[str]) -> int:
    """`spd ARGS` run in this process, warnings silenced; argparse's own exits included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return main(args)
        except SystemExit as exit_:
            return exit_.code


def test_issue_25_mistakes_end_in_one_line_with_their_exit_code(mistakes, model_dir, synth_root, capsys):
    root, own = mistakes
    before = _snapshot(root), _snapshot(synth_root)
    for args, exit_code, word in _mistake_cases(root, own, synth_root, str(model_dir)):
        code = _exit_code_of(args)
        captured = capsys.readouterr()
        err = captured.err if exit_code != 1 else captured.out  # data check lists its findings on stdout
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == exit_code, f"{args}: exit {code}, {captured.err}"
        assert "Traceback" not in captured.err, f"{args}: {captured.err}"
        assert len(lines) <= 1, f"{args}: {captured.err}"
        assert word in err, f"{args}: {word!r} not in {err!r}"
    after = _snapshot(root), _snapshot(synth_root)
    changed = {k for k in set(after[0]) | set(before[0]) if after[0].get(k) != before[0].get(k)}
    changed |= {k for k in set(after[1]) | set(before[1]) if after[1].get(k) != before[1].get(k)}
    assert not changed, f"a failing command created or changed {sorted(changed)}"


def test_ctrl_c_during_a_re_export_leaves_the_previous_export_whole(mistakes, monkeypatch):
    from spd.export import onnx_export

    root, _ = mistakes
    export = root / "onnx"
    manifest = (export / "manifest.json").read_text()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:  # the encoder is written, the decoder never is
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = onnx_export._export
    monkeypatch.setattr(onnx_export, "_export", interrupted)
    model = spd.load_model(root / "model96")
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model, export, height=72, width=96)
    assert (export / "manifest.json").read_text() == manifest
    assert not (root / ".onnx.partial").exists()
    spd.OnnxPredictor(export).predict(np.zeros((72, 96, 3), np.uint8), [[5, 5]])  # loads: checksums match


def test_the_projects_warnings_are_one_line_and_other_libraries_keep_theirs(capsys):
    import warnings as _warnings

    from spd.cli import run_reporting_errors

    def command():
        _warnings.warn("spd: bf16 linear layers run F.linear:\n  prefer fp32", RuntimeWarning)
        _warnings.warn("a third-party notice", UserWarning)
        return 0

    with _warnings.catch_warnings(record=True) as passed_on:  # what reaches Python's own handler
        _warnings.simplefilter("always")
        original = _warnings.showwarning
        assert run_reporting_errors("spd predict", command) == 0
        assert _warnings.showwarning is original  # restored after the command
    assert capsys.readouterr().err == "spd predict: warning: bf16 linear layers run F.linear: prefer fp32\n"
    assert [str(w.message) for w in passed_on] == ["a third-party notice"]  # Python's own form
