"""The code's shape holds (issues 11 and 24): no import cycles, short functions, small CLI modules, few
loose top-level modules, `spd --help` unchanged by the move to a package, strict encoder weights, fp32
depth heads under autocast, and a training step with no host sync."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from spd.models.encoder import Encoder
from spd.models.encoder_weights import EncoderWeightsError

SRC = Path(__file__).resolve().parents[1] / "src" / "spd"
# Taken before the CLI became a package (issue 24); since then changed only by commits that change a flag
# on purpose (issue 25: predict's --long-side, export's default size from the model's pixel scale; issue 29:
# serve's limits and loadcheck --hostile; issue 30: the new `spd ablate`; issue 27: export's --int8).
HELP_COPY = Path(__file__).resolve().parent / "fixtures" / "cli_help.txt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every spd module this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spd"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("spd"))
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of concerns; every other edge counts.
    def edges(m):
        return {i for i in graph[m] if not (modules[i].name == "__init__.py" and m.startswith(i + "."))}

    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges(node):
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_data_knows_no_model_and_models_no_training_loop_nor_data():
    for path in (SRC / "data").rglob("*.py"):
        assert not any(i.startswith("spd.models") for i in _imports(path, "")), path
    for path in (SRC / "models").rglob("*.py"):  # a model reads tensors, not dataset files
        assert not any(i.startswith(("spd.engine", "spd.data")) for i in _imports(path, "")), path


def test_functions_are_short():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                limit = 40 if (path.name, node.name) == ("train.py", "train") else 60
                if length > limit:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({length} lines)")
    assert not long, long


def test_cli_modules_are_small_and_few_modules_sit_loose_at_the_top():
    big = {p.name: n for p in (SRC / "cli").glob("*.py") if (n := len(p.read_text().splitlines())) > 150}
    assert not big, big
    loose = sorted(p.name for p in SRC.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 8, loose
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert {"bench", "cameras", "cli", "config", "experiments"} <= packages


HELP_SCRIPT = """
import contextlib, io, sys
from spd.cli import build_parser
for line in sys.stdin.read().splitlines():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args(line.split()[1:])
    print("=== " + line)
    print(out.getvalue(), end="")
"""


def test_every_help_text_is_the_one_taken_before_the_cli_became_a_package():
    """`spd --help`, `spd <command> --help` and `spd data check --help`, word for word (COLUMNS=100;
    one process for all fifteen)."""
    expected = HELP_COPY.read_text()
    titles = [line[4:] for line in expected.splitlines() if line.startswith("=== ")]
    assert len(titles) == 15
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], input="\n".join(titles), capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected


# --- encoder weights ------------------------------------------------------------------------------
def _timm_to_official(state: dict) -> dict:
    """timm ConvNeXt V2 keys -> the facebookresearch/ConvNeXt-V2 layout (the inverse of timm's filter)."""
    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = key.replace("head.fc.", "head.").replace("head.norm.", "norm.")
        parts = key.split(".")
        if parts[0] == "stages" and parts[2] == "downsample":
            key = ".".join(["downsample_layers", parts[1], *parts[3:]])
        elif parts[0] == "stages":
            key = ".".join(["stages", parts[1], *parts[3:]])
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn" in key:
            key = key.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
            value = value.reshape(1, 1, 1, -1)
        if "pwconv" in key and value.dim() == 4:  # atto's 1x1 convs are Linear layers upstream
            value = value.flatten(1)
        out[key] = value.clone()
    return out


def _official_to_fcmae(state: dict) -> dict:
    """The official dense layout -> FCMAE pre-training's sparse (MinkowskiEngine) encoder layout."""
    out = {"mask_token": torch.zeros(1, 8, 1, 1), "decoder.0.weight": torch.zeros(3, 3)}  # FCMAE decoder: dropped
    for key, value in state.items():
        if key.startswith(("norm.", "head.")):
            continue  # the pre-training encoder has no classifier
        parts = key.split(".")
        is_downsample = parts[0] == "downsample_layers" and parts[1] != "0"
        if "dwconv.weight" in key:  # (C, 1, k, k) -> (k*k, C)
            value, parts[-1] = value.transpose(3, 2).reshape(value.shape[0], -1).permute(1, 0), "kernel"
        elif is_downsample and parts[2] == "1" and parts[-1] == "weight":  # (out, in, k, k) -> (k*k, in, out)
            value = value.transpose(3, 2).reshape(value.shape[0], value.shape[1], -1).permute(2, 1, 0)
            parts[-1] = "kernel"
        elif (is_downsample and parts[2] == "0") or (parts[0] == "stages" and parts[3] == "norm"):
            parts.insert(-1, "ln")
        elif parts[0] == "stages" and parts[3].startswith("pwconv"):
            parts.insert(-1, "linear")
        if key.endswith("bias") and ("dwconv" in key or (is_downsample and parts[2] == "1")):
            value = value.reshape(1, -1)
        out["encoder." + ".".join(parts)] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def atto_state():
    torch.manual_seed(1)
    model = timm.create_model("convnextv2_atto", pretrained=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "grn" in name:
                param.normal_()  # GRN starts at zero: make a wrong mapping visible
    return model.state_dict()


def _encoder(path) -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Encoder("convnextv2_atto", str(path))


def test_timm_official_and_fcmae_layouts_load_to_identical_encoders(tmp_path, atto_state):
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in atto_state.items()}, str(timm_file))
    official = _timm_to_official(atto_state)
    torch.save({"model": official}, tmp_path / "official.pt")
    torch.save({"model": _official_to_fcmae(official)}, tmp_path / "fcmae.pt")
    encoders = {name: _encoder(tmp_path / name) for name in ("timm.safetensors", "official.pt", "fcmae.pt")}
    reference = encoders["timm.safetensors"].backbone.state_dict()
    for key, value in reference.items():  # the features-only model holds the same tensors as the file
        assert torch.equal(value, atto_state[key.replace("stem_", "stem.").replace("stages_", "stages.")]), key
    for name, encoder in encoders.items():
        state = encoder.backbone.state_dict()
        for key in reference:
            assert torch.equal(state[key], reference[key]), f"{name}: {key}"
        assert encoder.weights_info["tensors"] == len(reference), name
        assert len(encoder.weights_info["sha256"]) == 64, name


def test_a_missing_or_renamed_tensor_is_an_error_naming_the_key(tmp_path, atto_state):
    state = {k: v.contiguous() for k, v in atto_state.items()}
    state["stages.1.blocks.0.conv_dw.weight_renamed"] = state.pop("stages.1.blocks.0.conv_dw.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(EncoderWeightsError, match=r"stages\.1\.blocks\.0\.conv_dw\.weight"):
        _encoder(tmp_path / "renamed.safetensors")
    del state["stages.1.blocks.0.conv_dw.weight_renamed"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(EncoderWeightsError, match=r"missing \['stages\.1\.blocks\.0\.conv_dw\.weight'\]"):
        _encoder(tmp_path / "missing.safetensors")


def test_spd_train_stops_before_the_first_step_on_bad_encoder_weights(tmp_path, atto_state, synth_root):
    state = {k: v.contiguous() for k, v in atto_state.items() if k != "stem.0.weight"}
    save_file(state, str(tmp_path / "bad.safetensors"))
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "spd.cli", "train", "--config", "v15_tiny_synth", "--data-root", str(synth_root),
         "--out", str(run), "--max-steps", "2", "--set", "data.workers=0",
         "--set", f"model.encoder_weights={tmp_path / 'bad.safetensors'}"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "stem.0.weight" in result.stderr
    assert not (run / "metrics.jsonl").exists()


# --- precision and host syncs -----------------------------------------------------------------------
def test_depth_heads_take_exp_in_fp32_under_bf16_autocast(tiny_model):
    images, queries = torch.randn(1, 3, 64, 96), torch.rand(1, 9, 2) * torch.tensor([95.0, 63.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = tiny_model.encode(images)
        out = tiny_model.decode(features, queries, return_aux=True, paths=spd_reference())
        head_input = torch.randn(1, 9, tiny_model.head.mlp[0].in_features)
        log_depth = tiny_model.head.mlp(head_input).squeeze(-1)
        depth = tiny_model.head(head_input)
    assert log_depth.dtype == torch.bfloat16  # autocast did reach the head's matmuls ...
    for name, value in out.items():
        assert value.dtype == torch.float32, name  # ... but every depth leaves it in fp32
    torch.testing.assert_close(depth, torch.exp(log_depth.float() * tiny_model.head.log_scale.exp()), rtol=1e-6, atol=0)


def spd_reference():
    import spd

    return spd.InferencePaths.reference()


# --- version floors ---------------------------------------------------------------------------------
def test_version_floors_are_stated_once_and_checked():
    import re

    from spd.versions import FLOORS, too_old

    pyproject = (SRC.parents[1] / "pyproject.toml").read_text()
    stated = dict(re.findall(r'"(torch|torchvision|timm)>=([\d.]+)"', pyproject))
    assert stated == FLOORS
    assert too_old() == []  # this environment (what CI installs) meets them
    assert too_old({"torch": "2.14.1+cu130", "torchvision": "0.19.1", "timm": "1.0.31"}) == [
        "torchvision 0.19.1 found, 0.23 or newer needed"]
    # pre-releases sort below their release, as pip sorts them: 0.22rc9 is not 0.229
    assert too_old({"torch": "2.8.0rc1", "torchvision": "0.22rc9", "timm": "1.0.dev0"}) == [
        "torch 2.8.0rc1 found, 2.8 or newer needed", "torchvision 0.22rc9 found, 0.23 or newer needed",
        "timm 1.0.dev0 found, 1.0 or newer needed"]
    assert too_old({"torch": "2.8.0", "torchvision": "0.23.0+cpu", "timm": "1.0.post1"}) == []
    assert too_old({"torch": "not-a-version", "torchvision": "0.23", "timm": "1.0"}) == [
        "torch not-a-version found, 2.8 or newer needed"]
