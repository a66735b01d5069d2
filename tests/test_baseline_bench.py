"""The Depth Anything V2-S baseline and `spd bench` (issue 6)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from spd.bench.inference import bf16_matmul_floor  # noqa: E402
from spd.models.baseline import DepthAnythingBaseline, DenseDepth, baseline_input_size  # noqa: E402


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return DepthAnythingBaseline().eval()


def test_parameter_count_is_dav2_small(baseline):
    count = sum(p.numel() for p in baseline.parameters())
    assert abs(count - 24.8e6) / 24.8e6 < 0.01, count


def test_input_sizes():
    assert baseline_input_size(480, 640, "fair") == (476, 644)
    assert baseline_input_size(480, 640, "official") == (518, 686)


def test_queries_sample_the_dense_map(baseline):
    depth_map = torch.arange(6 * 8, dtype=torch.float32).view(1, 1, 6, 8) + 1
    features = DenseDepth(depth_map, (6, 8))
    queries = torch.tensor([[[0.0, 0.0], [7.0, 5.0], [3.0, 2.0], [3.5, 2.0]]])
    out = baseline.decode(features, queries)
    torch.testing.assert_close(out, torch.tensor([[1.0, 48.0, 20.0, 20.5]]))
    with pytest.raises(ValueError, match="query 1 = "):
        baseline.decode(features, torch.tensor([[[0.0, 0.0], [9.0, 0.0]]]))


def test_baseline_end_to_end_shapes(baseline):
    with torch.no_grad():
        out = baseline(torch.randn(1, 3, 60, 90), torch.tensor([[[1.0, 2.0], [80.0, 50.0]]]), return_aux=True)
    assert out["depth"].shape == (1, 2)
    assert out["dense_depth"].shape == (1, 1, 60, 90)
    assert (out["depth"] > 0).all()
    assert (out["depth"] <= 10).all()


def test_every_trainable_baseline_parameter_gets_a_gradient(baseline):
    """DDP's precondition (no unused trainable parameters) for `spd train` with architecture=dav2-small."""
    baseline.train()
    try:
        out = baseline(torch.randn(1, 3, 56, 70), torch.tensor([[[3.0, 4.0]]]), return_aux=True)
        (out["dense_depth"].mean() + out["depth"].mean()).backward()
        missing = [n for n, p in baseline.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
    finally:
        baseline.zero_grad(set_to_none=True)
        baseline.eval()


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "spd.cli", "bench", "--height", "64", "--width", "96", "--k", "1,16",
                    "--repeat", "1", "--json", str(out), "--plot", str(tmp_path / "bench.png"), "--no-train-step",
                    "--batch", "1,2"], check=True, capture_output=True)
    result = json.loads(out.read_text())
    throughput = result["throughput"]["fp32"]  # images/s of both models at each batch size
    assert set(throughput) == {"1", "2"}
    assert all(t["spd_images_per_s"] > 0 and t["baseline_images_per_s"] > 0 for t in throughput.values())
    casts = result["casts"]  # dtype conversions of one Predictor encode and decode (issue 28)
    assert casts["k"] == 16 and 0 < casts["fp32"]["encode"] <= 40 and 0 < casts["fp32"]["decode"] <= 10
    for key in ("encode_ms", "decode_ms", "total_ms"):
        assert key in result["spd"]
    assert set(result["spd"]["decode_ms"]) == {"1", "16"}
    assert set(result["ratio_total"]) == {"1", "16"}
    assert result["baseline"]["total_ms"] > 0
    assert result["macs"]["baseline"] > result["macs"]["encode"] > 0
    assert 0 < result["macs"]["decode_per_query"]
    assert result["decode_host_syncs"] == 0
    assert 50 < result["decode_ops"] < 5000
    assert {"device", "torch", "threads"} <= set(result)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result["allocator"]["malloc"] == ("glibc, tuned" if glibc else "default")  # the `spd` command tunes it
    assert set(result["ratio_decode_encode"]) == {"1", "16"}
    fast = result["fast_paths"]  # each exact fast path timed on and off
    assert all(fast[k] > 0 for k in ("encoder_fast_ms", "encoder_reference_ms", "decoder_fast_ms", "decoder_reference_ms"))
    rates = fast.get("linear_fp32_gmacs")  # F.linear's and oneDNN's fp32 GEMM rates, side by side
    if rates is not None:
        assert rates["shape"] == [16 * 24, 96, 384]
        assert min(rates["f_linear"], rates["bf16"]) > 0 and rates["bf16_kernel"] in ("oneDNN", "F.linear")
        assert rates["onednn"] is None or rates["onednn"] > 0  # None where oneDNN's fp32 linear is not used
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_baseline_linears_through_onednn_equal_the_plain_forward(baseline):
    """At inference on CPU the baseline's linear layers run through oneDNN, as SPD's encoder's do
    (`spd.models.onednn`): the same dense map as transformers' plain forward."""
    from torch.profiler import ProfilerActivity, profile

    from spd.models.onednn import onednn_runs

    if not onednn_runs(torch.float32):
        pytest.skip("oneDNN's fp32 linear is not used on this machine (no oneDNN, or below AVX-512: MKL is faster)")
    torch.manual_seed(1)
    images = torch.randn(1, 3, 56, 84)
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fast = baseline.encode(images).depth
        plain = baseline.encode(images, fast_linears=False).depth
    assert any(event.name == "mkldnn::_linear_pointwise" for event in prof.events())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


@pytest.mark.parametrize("setting", ["tuned", "default"])
def test_tune_cpu_allocator_applies_on_glibc_unless_told_not_to(setting):
    """`spd.tune_cpu_allocator()` sets glibc's malloc thresholds (in a child process: it is process-wide);
    SPD_MALLOC=default leaves them."""
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if k != "SPD_MALLOC"}
    if setting == "default":
        env["SPD_MALLOC"] = "default"
    code = "import spd, spd.allocator as a; print(spd.tune_cpu_allocator(), a.allocator_setting()['malloc'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.split()
    assert out == (["True", "glibc,", "tuned"] if setting == "tuned" else ["False", "default"])


def test_a_typo_in_spd_malloc_ends_in_one_line():
    env = {**os.environ, "SPD_MALLOC": "defualt"}
    result = subprocess.run([sys.executable, "-m", "spd.cli", "params", "--preset", "v15-tiny"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "spd params: error: SPD_MALLOC must be 'default' or 'tuned' (or unset); got 'defualt'"]


def test_bf16_floor_is_every_mac_at_the_measured_bf16_gemm_rate():
    """`spd bench --dtype fp32,bf16`'s floor: (encode + decode(K) MACs) / bf16 GEMM rate, over fp32's total(K)."""
    result = {
        "fast_paths": {"linear_fp32_gmacs": {"f_linear": 90.0, "onednn": 200.0, "bf16": 400.0}},
        "macs": {"encode": 28e9},
        "spd": {"decode_macs": {"256": 2e9}, "total_ms": {"256": 250.0}},
    }
    floor = bf16_matmul_floor(result, "256")
    assert floor["gmacs"] == pytest.approx(30.0)
    assert floor["ms"] == pytest.approx(75.0)  # 30 GMAC at 400 GMAC/s
    assert floor["over_first_dtype_total"] == pytest.approx(0.3)
    assert bf16_matmul_floor({**result, "fast_paths": {}}, "256") is None  # no rates measured (compiled run, no oneDNN)


RSS_AFTER_A_FREE = """
import sys, torch
import spd.cli.{module} as command
from spd.allocator import allocator_setting
from spd.cli import main

command.{func} = lambda args: 0  # the command's work is not the point: what main sets up around it is
main(sys.argv[1:])
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mib()
blocks = [torch.ones(4 * 2**20) for _ in range(150)]  # 150 x 16 MiB
del blocks
print(allocator_setting()["malloc"], round(rss_mib() - before))
"""


@pytest.mark.parametrize("argv, module, func, tuned", [
    (["train", "--config", "v15_tiny_synth", "--data-root", ".", "--out", "run"], "train", "run", False),
    (["data", "check", "--root", ".", "--filelist", "x"], "data", "run_check", False),
    (["predict", "--model", "m", "--image", "i.png", "--points", "1,1"], "predict", "run", True),
])
def test_only_inference_commands_tune_the_allocator(argv, module, func, tuned):
    """`spd train` and the data tools keep glibc's defaults: freed memory goes back to the OS."""
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if k != "SPD_MALLOC"}
    code = RSS_AFTER_A_FREE.format(module=module, func=func)
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True, capture_output=True, text=True)
    setting, kept_mib = out.stdout.split()[-2], int(out.stdout.split()[-1])
    assert setting == ("tuned" if tuned else "default")
    assert (kept_mib > 64) if tuned else (kept_mib < 64), kept_mib  # tuned: ~350 MiB kept


def test_a_training_batch_that_does_not_fit_is_skipped_with_the_reason(monkeypatch):
    """On a CPU the bench skips a training-step batch whose measured footprint (~3 GB per image) exceeds
    the memory available, and says so, instead of running into the OOM killer."""
    from spd.bench import train_step

    monkeypatch.setattr(train_step, "available_memory_bytes", lambda: 8 * 2**30)
    sections = train_step.training_step_sections("cpu", ["fp32"], [1, 6],
                                                 run=lambda device, dtype, batch, repeat: {"dtype": dtype, "batch": batch})
    assert sections[0] == {"dtype": "fp32", "batch": 1}
    assert sections[1]["batch"] == 6 and "needs ~18 GB" in sections[1]["skipped"] and "8.0 GB available" in sections[1]["skipped"]
    assert "skipped, needs ~18 GB" in train_step.format_training_step("fp32", sections[1])
    assert train_step.memory_shortfall(torch.device("cuda"), 6) is None  # a GPU's memory is its own matter


def test_baseline_exports_its_attention_without_the_nan_guard(baseline, tmp_path):
    """The ONNX export of DAv2-S takes the attention form ONNX Runtime runs best (`plain_attention`):
    PyTorch's SDPA exports with IsNaN + Where over every attention matrix (~22 % of DAv2-S's ORT time
    at 480x640), which an unmasked ViT never needs. Same depths; PyTorch keeps SDPA afterwards."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from spd.bench.onnx import export_baseline
    from spd.export.runtime import session_options

    backbone = baseline.net.backbone
    before = backbone.config._attn_implementation
    path = tmp_path / "baseline.onnx"
    export_baseline(baseline, path, 64, 96)
    assert backbone.config._attn_implementation == before  # restored for PyTorch
    op_types = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    layers = baseline.net.config.backbone_config.num_hidden_layers
    # one Softmax per layer and no guard (an IsNaN and a Where per layer); the one Where left is the query mask's
    assert op_types.count("Softmax") == layers and "IsNaN" not in op_types and op_types.count("Where") < layers
    torch.manual_seed(1)
    image, queries = torch.rand(1, 3, 64, 96), torch.rand(1, 7, 2) * torch.tensor([95.0, 63.0])
    with torch.no_grad():
        expected = baseline.decode(baseline.encode(image), queries).numpy()
    session = ort.InferenceSession(str(path), session_options(ort, 2), providers=["CPUExecutionProvider"])
    depth = session.run(None, {"image": image.numpy(), "queries": queries.numpy()})[0]
    assert np.abs(depth - expected).max() <= 1e-4 * np.abs(expected).max()
