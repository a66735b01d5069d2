"""The inference and training paths on every available device (cpu always, cuda when present): fast
== reference, one compiled graph per K bucket, bf16 close to fp32, no host sync (issue 13)."""

import glob
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import spd
from conftest import DEVICES

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"


def _tiny(device: str, spread: float = 0.3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = spd.build_model("v15-tiny", warn_random_encoder=False).eval()
    with torch.no_grad():  # non-trivial gates, offsets and GRN so that every path does real work
        for name, param in model.named_parameters():
            if any(key in name for key in ("grn", "sampling_offsets.weight", "attention_weights.weight", "gate")):
                param.normal_(0, spread)
    return model.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_paths_match_reference_paths(device, no_tf32):
    model = _tiny(device)
    images = torch.randn(2, 3, 70, 101, device=device)
    queries = torch.rand(2, 37, 2, device=device) * torch.tensor([100.0, 69.0], device=device) - 0.25
    mask = torch.rand(2, 37, device=device) > 0.2
    with torch.no_grad():
        fast = model.decode(model.encode(images), queries, mask)
        reference_paths = spd.InferencePaths.reference()
        reference = model.decode(model.encode(images, reference_paths), queries, mask, paths=reference_paths)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_predictor_is_one_graph_per_shape_and_equals_eager(device, no_tf32):
    """The whole predictor compiled (fullgraph; CUDA graphs on CUDA): three real frames of one size and
    K = 50, 60 (one bucket, 64) compile encode once and decode once, with no recompile after those
    first calls (dynamo's counters), and give the eager predictor's depths."""
    from torch._dynamo.utils import counters

    # Milder random weights than the fast-path test: compiled kernels (other GEMMs, fused index maths)
    # round sampling positions differently by ~1e-7, which very steep random weights amplify.
    model = _tiny(device, spread=0.1)
    compiled = spd.Predictor(model, device, compile=True)
    eager = spd.Predictor(model, device, buckets=compiled.buckets)  # the same padded shapes, eager
    images = [str(FIXTURES / "sync" / f"rgb_{i:05d}.jpg") for i in (0, 50)] + [str(FIXTURES / "sync" / "rgb_00000.jpg")]
    generator = np.random.default_rng(0)
    points = [generator.uniform([0, 0], [639, 479], size=(k, 2)) for k in (50, 60)]
    torch._dynamo.reset()
    counters.clear()
    first = compiled.decode(compiled.encode(images[0]), points[0])  # compiles encode and decode(64)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2, dict(counters["stats"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for image in images[1:]:
            features = compiled.encode(image)
            for query_points in points:
                np.testing.assert_allclose(compiled.decode(features, query_points),
                                           eager.decode(eager.encode(image), query_points), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs
    np.testing.assert_allclose(first, eager.predict(images[0], points[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bucket_padding_is_exact(device, no_tf32):
    """Padding a chunk with masked queries up to its bucket changes no real query's depth."""
    model = _tiny(device)
    exact = spd.Predictor(model, device)
    padded = spd.Predictor(model, device, buckets=(64, 256))
    image = str(FIXTURES / "sync" / "rgb_00050.jpg")
    points = np.random.default_rng(1).uniform([0, 0], [639, 479], size=(23, 2))
    np.testing.assert_allclose(padded.predict(image, points), exact.predict(image, points), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inference_stays_within_one_percent_on_real_frames(device):
    """v15 (random weights) on the real NYU fixture frames: bf16 autocast vs fp32 (on a CPU two of the five
    frames: bf16 matmuls run at ~5 GMAC/s on an AVX2-only CPU, ~17 s per frame)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = spd.build_model("v15", warn_random_encoder=False)
    fp32, bf16 = spd.Predictor(model, device), spd.Predictor(model, device, dtype="bf16")
    generator = np.random.default_rng(0)
    relative = []
    frames = sorted(glob.glob(str(FIXTURES / "*" / "rgb*")))
    for path in frames if device == "cuda" else frames[:2]:
        points = generator.uniform([0, 0], [639, 479], size=(256, 2))
        reference = fp32.predict(path, points)
        low = bf16.predict(path, points)
        assert low.dtype == np.float32
        relative.append(np.abs(low - reference) / reference)
    relative = np.concatenate(relative)
    assert relative.mean() <= 0.01, relative.mean()
    assert np.isfinite(relative).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weight_copy_equals_plain_autocast_and_leaves_the_model_alone(device):
    """The bf16 predictor's model copy (weights cast once) gives plain autocast's depths; the fp32
    islands (MSDA's offset and attention projections, norms) keep fp32 weights; the original is fp32."""
    from spd.models.precision import low_precision_copy

    model = _tiny(device).eval()
    low = low_precision_copy(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert low.msda_layers[0].cross.sampling_offsets.weight.dtype == torch.float32
    assert low.msda_layers[0].cross.output_proj.weight.dtype == torch.bfloat16
    assert low.msda_layers[0].norm_cross.weight.dtype == torch.float32
    images = torch.randn(1, 3, 70, 101, device=device)
    queries = torch.rand(1, 37, 2, device=device) * torch.tensor([100.0, 69.0], device=device)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        plain = model.decode(model.encode(images), queries)
        cast_once = low.decode(low.encode(images), queries)
    torch.testing.assert_close(cast_once, plain, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_makes_no_host_sync(device, tmp_path, synth_root):
    """One v15-tiny step that does not log, its batch already loaded (as DataLoader workers deliver
    it): no `.item()` / `_local_scalar_dense` from the step. On CPU the fused AdamW kernel reads its
    step count and `found_inf` with item() inside the C++ kernel (CPU memory, no device to sync with);
    on CUDA the same kernel reads them on the device, so there nothing is excused."""
    from torch.profiler import ProfilerActivity, profile

    from spd.engine.distributed import DistInfo
    from spd.engine.loop import TrainState, train_step
    from spd.engine.train import build_session
    from spd.config.training import load_config

    cfg = load_config("v15_tiny_synth", ["data.num_queries=32", "batch_size=2", "data.workers=0", "data.crop_size=[64,96]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = build_session(cfg, synth_root, tmp_path / "run", DistInfo(device=torch.device(device)))
    state, batches = TrainState(), session.epochs.batches(0, 0)
    loaded = [next(batches), next(batches)]
    train_step(session, iter(loaded[:1]), state)  # warm-up: optimiser state created
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(session, iter(loaded[1:]), state)
    excused = {"aten::_fused_adamw_"} if device == "cpu" else set()
    syncs = []
    for event in prof.events():
        if event.name in ("aten::item", "aten::_local_scalar_dense"):
            parent = event.cpu_parent
            while parent is not None and parent.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"):
                parent = parent.cpu_parent
            if parent is None or parent.name not in excused:
                syncs.append(parent.name if parent is not None else "<python>")
    assert not syncs, syncs
