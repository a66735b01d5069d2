"""How low SPD / DAv2-S can go on this CPU: v15's encoder MLP linears timed inside a real encode
against the CPU's own peak GEMM rate, everything else as measured, beside DAv2-S in the same rounds.

    .venv/bin/python scripts/cpu_floor.py [--k 256] [--rounds 7] [--dtype fp32,bf16] [--onnx]

Per dtype (bf16 only where oneDNN runs it), medians over rounds that time SPD encode, decode(K) and
DAv2-S's total one after another (a shared machine drifts by 10 % between minutes):
- the encoder's 24 MLP linear layers (~25.5 GMACs at 480x640, ~75 % of an fp32 encode), each call
  timed inside the encode (`spd.models.encoder.linear` wrapped; torch.profiler inflates the largest
  of them by ~50 %, so it is not used here), and their rate;
- the peak rate of the same kernel (its best on a 2048^3 GEMM and on v15's stage-3 / stage-4 MLP
  layers), the most those layers could run at;
- the floor: SPD total(K) / DAv2-S with every encoder linear at that peak and everything else
  (depthwise convolutions, norms, GRN, the neck, the decoder) as measured; and with the rest of the
  encoder free as well. When the floor is above a target, no kernel choice for the linears meets it.

`--onnx` adds the same for both models exported and run on ONNX Runtime (fp32, the session options
of `spd.export.runtime`): the encoder graph's Gemm / MatMul nodes from ORT's own profiler (node time
and MACs from their shapes) against MLAS's peak rate on the same GEMMs with a constant weight.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import torch

import spd
import spd.models.encoder as encoder_module
from spd.bench.inference import build_setup, setup_for_dtype
from spd.bench.machine import cpu_facts
from spd.cli.args import k_list
from spd.models.onednn import linear, onednn_runs


class LinearTimer:
    """Wraps the encoder's `linear` and records each call's wall time and MACs, by layer shape."""

    def __init__(self) -> None:
        self.ms: dict[tuple, list[float]] = collections.defaultdict(list)
        self.macs: dict[tuple, int] = {}

    def __call__(self, x, weight, *args, **kwargs):
        start = time.perf_counter()
        out = linear(x, weight, *args, **kwargs)
        key = (tuple(x.shape), tuple(weight.shape))
        self.ms[key].append((time.perf_counter() - start) * 1000)
        self.macs[key] = x.numel() * weight.shape[0]
        return out

    def per_encode(self, encodes: int) -> tuple[float, float]:
        """(median ms, GMACs) of one encode's linear layers."""
        calls_per_encode = {key: len(times) // encodes for key, times in self.ms.items()}
        ms = sum(statistics.median(self.ms[key]) * n for key, n in calls_per_encode.items())
        return ms, sum(self.macs[key] * n for key, n in calls_per_encode.items()) / 1e9


# GEMMs a kernel's peak is taken over (M, K, N): a large square one and v15's stage-3 / stage-4 MLP
# layers at 480x640, which run fastest here; the best rate of any of them is the peak.
PEAK_SHAPES = ((2048, 2048, 2048), (1200, 384, 1536), (300, 768, 3072))


def peak_gmacs(dtype: torch.dtype, repeat: int = 5) -> float:
    """GMAC/s of `spd.models.onednn.linear` (the encoder's kernel) at its best over `PEAK_SHAPES`."""
    generator = torch.Generator().manual_seed(0)
    rates = []
    for rows, inner, outer in PEAK_SHAPES:
        x = torch.randn(rows, inner, generator=generator).to(dtype)
        weight = torch.randn(outer, inner, generator=generator).to(dtype)
        bias = torch.zeros(outer, dtype=dtype)
        with torch.inference_mode():
            linear(x, weight, bias)
            best = min(_ms(lambda: linear(x, weight, bias)) for _ in range(repeat))
        rates.append(rows * inner * outer / best / 1e6)
    return max(rates)


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def floor_for(setup, dtype: str, k: int, rounds: int) -> dict:
    timer = LinearTimer()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    queries = setup.queries[k]
    times: dict[str, list[float]] = {"encode": [], "decode": [], "dav2s": []}
    encoder_module.linear = timer
    try:
        with torch.inference_mode(), autocast:
            for round_ in range(rounds + 2):  # two warm-up rounds
                if round_ == 2:
                    timer.ms.clear()
                features = setup.encode(setup.image)
                encode_ms = _ms(lambda: setup.encode(setup.image))
                decode_ms = _ms(lambda: setup.decode(features, queries))
                base_ms = _ms(lambda: setup.base_decode(setup.base_encode(setup.image), queries))
                if round_ >= 2:
                    for name, value in zip(times, (encode_ms, decode_ms, base_ms)):
                        times[name].append(value)
    finally:
        encoder_module.linear = linear
    encode, decode, dav2s = (statistics.median(times[name]) for name in times)
    linear_ms, linear_gmacs = timer.per_encode(encodes=2 * rounds)  # two encodes per round
    peak = peak_gmacs(torch.bfloat16 if dtype == "bf16" else torch.float32)
    at_peak_ms = linear_gmacs / peak * 1000
    return {
        "dtype": dtype, "k": k, "encode_ms": encode, "decode_ms": decode, "dav2s_ms": dav2s,
        "linear_ms": linear_ms, "linear_gmacs": linear_gmacs, "linear_gmac_per_s": linear_gmacs / linear_ms * 1000,
        "peak_gmac_per_s": peak, "rest_of_encode_ms": encode - linear_ms,
        "ratio": (encode + decode) / dav2s,
        "floor_linears_at_peak": (encode - linear_ms + at_peak_ms + decode) / dav2s,
        "floor_only_linears_and_decode": (at_peak_ms + decode) / dav2s,
    }


def onnx_floor(setup, k: int, rounds: int) -> dict:
    """The floor on ONNX Runtime, fp32: both models exported as `spd bench --backend onnx` exports them."""
    import onnxruntime as ort

    from spd.bench.onnx import export_baseline
    from spd.bench.onnx_profile import node_events
    from spd.export.onnx_export import ENCODER_FILE, export_onnx
    from spd.export.runtime import OnnxPredictor, session_options

    threads = torch.get_num_threads()
    height, width = setup.image.shape[-2:]
    image, queries = setup.image.cpu(), setup.queries[k].cpu()
    mask = torch.ones(queries.shape[:2], dtype=torch.bool)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(setup.spd_model, tmp, height, width, any_scale=True)
        export_baseline(setup.baseline, Path(tmp) / "baseline.onnx", height, width)
        predictor = OnnxPredictor(tmp, threads=threads)
        baseline = ort.InferenceSession(str(Path(tmp) / "baseline.onnx"), session_options(ort, threads),
                                        providers=["CPUExecutionProvider"])
        base_feeds = {"image": image.numpy(), "queries": queries.numpy()}
        times: dict[str, list[float]] = {"encode": [], "decode": [], "dav2s": []}
        for round_ in range(rounds + 2):
            features = predictor._encode_tensor(image)
            measured = (_ms(lambda: predictor._encode_tensor(image)), _ms(lambda: predictor._run_decoder(features, queries, mask)),
                        _ms(lambda: baseline.run(None, base_feeds)))
            if round_ >= 2:
                for name, value in zip(times, measured):
                    times[name].append(value)
        runs = 3
        events = node_events(ort, Path(tmp) / ENCODER_FILE, session_options(ort, threads), {"image": image.numpy()}, runs)
    matmuls = [e for e in events if "Gemm" in e["args"]["op_name"] or "MatMul" in e["args"]["op_name"]]
    matmul_ms = sum(e["dur"] for e in matmuls) / 1000 / runs
    matmul_gmacs = sum(_macs(e) for e in matmuls) / 1e9 / runs
    encode, decode, dav2s = (statistics.median(times[name]) for name in times)
    peak = mlas_peak_gmacs(ort, threads)
    return {
        "encode_ms": encode, "decode_ms": decode, "dav2s_ms": dav2s, "matmul_ms": matmul_ms, "matmul_gmacs": matmul_gmacs,
        "matmul_gmac_per_s": matmul_gmacs / matmul_ms * 1000, "peak_gmac_per_s": peak,
        "ratio": (encode + decode) / dav2s,
        "floor_matmuls_at_peak": (encode - matmul_ms + matmul_gmacs / peak * 1000 + decode) / dav2s,
    }


def _macs(event: dict) -> int:
    """Multiply-accumulates of one Gemm / MatMul node run: output elements x the reduced length (the
    first input's last dimension: the exported Gemms do not transpose their first input)."""
    first = next(iter(event["args"]["input_type_shape"][0].values()))
    output = next(iter(event["args"]["output_type_shape"][0].values()))
    return math.prod(output) * first[-1]


def mlas_peak_gmacs(ort, threads: int, repeat: int = 5) -> float:
    """GMAC/s of ONNX Runtime's Gemm (MLAS) with a constant weight, as the exported encoder's MLP
    layers have, at its best over `PEAK_SHAPES`."""
    from onnx import TensorProto, helper, numpy_helper

    from spd.export.runtime import session_options

    rng = np.random.default_rng(0)
    rates = []
    for rows, inner, outer in PEAK_SHAPES:
        weight = numpy_helper.from_array(rng.standard_normal((outer, inner), dtype=np.float32), "weight")
        graph = helper.make_graph([helper.make_node("Gemm", ["a", "weight"], ["y"], transB=1)], "peak",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, outer])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), session_options(ort, threads),
                                       providers=["CPUExecutionProvider"])
        feeds = {"a": rng.standard_normal((rows, inner), dtype=np.float32)}
        session.run(None, feeds)
        best = min(_ms(lambda: session.run(None, feeds)) for _ in range(repeat))
        rates.append(rows * inner * outer / best / 1e6)
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=k_list, default=(256,), help="one query count (default 256)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--onnx", action="store_true", help="also both models on ONNX Runtime (fp32)")
    args = parser.parse_args()
    k = args.k[0]
    spd.tune_cpu_allocator()  # as `spd bench` runs
    warnings.simplefilter("ignore")
    cpu = cpu_facts()
    print(f"cpu {cpu['model']} ({', '.join(cpu['isa_flags'])}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, v15 at 480x640, K = {k}, medians of {args.rounds} rounds")
    setup = build_setup(480, 640, (k,), "cpu", compile=False, baseline_input="fair")
    for dtype in args.dtype.split(","):
        if dtype == "bf16" and not onednn_runs(torch.bfloat16):
            print("bf16: skipped (oneDNN has no bf16 inner product on this CPU)")
            continue
        r = floor_for(setup_for_dtype(setup, dtype, compile=False), dtype, k, args.rounds)
        print(f"{dtype}: encode {r['encode_ms']:.0f} ms = MLP linears {r['linear_ms']:.0f} ms "
              f"({r['linear_gmacs']:.1f} GMACs at {r['linear_gmac_per_s']:.0f} GMAC/s; this kernel's peak "
              f"{r['peak_gmac_per_s']:.0f}) + the rest {r['rest_of_encode_ms']:.0f} ms; decode({k}) "
              f"{r['decode_ms']:.0f} ms; DAv2-S {r['dav2s_ms']:.0f} ms")
        print(f"  SPD / DAv2-S {r['ratio']:.3f}; with every MLP linear at peak {r['floor_linears_at_peak']:.3f}; "
              f"at peak and the rest of the encoder free {r['floor_only_linears_and_decode']:.3f}")
    if args.onnx:
        r = onnx_floor(setup, k, args.rounds)
        print(f"ONNX Runtime fp32: encode {r['encode_ms']:.0f} ms, of which Gemm / MatMul nodes {r['matmul_ms']:.0f} ms "
              f"({r['matmul_gmacs']:.1f} GMACs at {r['matmul_gmac_per_s']:.0f} GMAC/s; MLAS's peak {r['peak_gmac_per_s']:.0f}); "
              f"decode({k}) {r['decode_ms']:.0f} ms; DAv2-S {r['dav2s_ms']:.0f} ms")
        print(f"  SPD / DAv2-S {r['ratio']:.3f}; with every Gemm / MatMul at peak {r['floor_matmuls_at_peak']:.3f}")


if __name__ == "__main__":
    main()
