"""How low SPD / DAv2-S can go on this CPU: v15's encoder MLP linears timed inside a real encode
against the CPU's own peak GEMM rate, everything else as measured, beside DAv2-S in the same rounds.

    .venv/bin/python scripts/cpu_floor.py [--k 256] [--rounds 7] [--dtype fp32,bf16]

Per dtype (bf16 only where oneDNN runs it), medians over rounds that time SPD encode, decode(K) and
DAv2-S's total one after another (a shared machine drifts by 10 % between minutes):
- the encoder's 24 MLP linear layers (~25.5 GMACs at 480x640, ~75 % of an fp32 encode), each call
  timed inside the encode (`spd.models.encoder.linear` wrapped; torch.profiler inflates the largest
  of them by ~50 %, so it is not used here), and their rate;
- the peak rate of the same kernel on a large square GEMM (2048^3), the most those layers could run at;
- the floor: SPD total(K) / DAv2-S with every encoder linear at that peak and everything else
  (depthwise convolutions, norms, GRN, the neck, the decoder) as measured; and with the rest of the
  encoder free as well. When the floor is above a target, no kernel choice for the linears meets it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
import warnings

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


def peak_gmacs(dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> float:
    """GMAC/s of `spd.models.onednn.linear` (the encoder's kernel) on a size^3 GEMM: best of `repeat`."""
    generator = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    bias = torch.zeros(size, dtype=dtype)
    with torch.inference_mode():
        linear(x, weight, bias)
        best = min(_ms(lambda: linear(x, weight, bias)) for _ in range(repeat))
    return size**3 / best / 1e6


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=k_list, default=(256,), help="one query count (default 256)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="fp32,bf16")
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


if __name__ == "__main__":
    main()
