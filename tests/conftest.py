import os
import warnings

import pytest
import torch

import spd


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers), each worker is one of several processes
    sharing the cores: one torch thread each, and its subprocesses likewise, instead of every
    process spinning as many OpenMP threads as there are cores (measured: several times slower)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    """A random-initialised v15-tiny in eval mode (the real code paths, small widths)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return spd.build_model("v15-tiny", warn_random_encoder=False).eval()


def random_queries(batch: int, k: int, height: int, width: int, generator=None) -> torch.Tensor:
    """Uniform pixel (u, v) inside an image, float32, (B, K, 2)."""
    scale = torch.tensor([width - 1.0, height - 1.0])
    return torch.rand(batch, k, 2, generator=generator) * scale


@pytest.fixture(scope="session")
def export_160(tmp_path_factory):
    """(model folder, export folder): a random v15-tiny recording 120 x 160 training frames (the demo's
    scale), saved and exported by `spd export` at its default size, 120 x 160. One ONNX export costs
    ~50 s on a 2-core CPU, so the tests that only need *an* export share this one (copy it to change it)."""
    from spd.cli.main import main

    root = tmp_path_factory.mktemp("export_160")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=160).eval()
    spd.save_model(model, root / "model")
    assert main(["export", "--model", str(root / "model"), "--out", str(root / "onnx")]) == 0
    return root / "model", root / "onnx"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic NYU-layout set: 16 train + 4 test frames at 96 x 128, with holes."""
    from spd.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), n_train=16, n_test=4, size=(96, 128), holes=True, seed=3,
                    workers=1, progress=False)


# Tests that take a `device` run on the CPU always and on CUDA when a GPU is present (`make gpu-check`).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")),
]


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls on CUDA (cuDNN convolutions default to TF32, ~1e-3 relative),
    so that fast-vs-reference comparisons test the maths, not the precision mode."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
