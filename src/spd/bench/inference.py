"""`spd bench`: SPD (encode once, decode K queries) against the dense Depth Anything V2-S baseline,
in one process, same input, same settings (both eager or both compiled), medians after warm-up."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from spd.allocator import allocator_setting
from spd.bench.machine import cpu_facts, format_machine, kernel_facts
from spd.bench.train_step import format_training_step, median_ms, sync_device, training_step_sections
from spd.errors import UserInputError
from spd.models.baseline import DepthAnythingBaseline, baseline_input_size
from spd.models.build import build_model
from spd.models.onednn import linear as onednn_linear
from spd.models.onednn import fused_linear_kernel, kernel_problem, onednn_available, onednn_runs, register_flop_formula
from spd.models.precision import low_precision_copy
from spd.predictor import Predictor, compiled_encode_decode


def split_spd(encode, decode, image: torch.Tensor, queries: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(encode ms, decode ms) of one SPD call on an image: the decode runs right after its encode."""
    start = time.perf_counter()
    features = encode(image)
    sync_device(device)
    middle = time.perf_counter()
    decode(features, queries)
    sync_device(device)
    end = time.perf_counter()
    return (middle - start) * 1000, (end - middle) * 1000


def measure_fast_paths(model, image: torch.Tensor, queries: torch.Tensor, k: int, repeat: int, device) -> dict:
    """Each exact inference fast path on and off (eager): encode with the folded encoder against
    timm's forward, decode(K) with the gather / in-place paths against the reference paths (the
    LDRM receptive-field path stays on in both: the full 28x28 patches cost ~17x the MACs)."""
    fast = model.inference_paths()
    features = model.encode(image)
    out = {"k": k}
    for state, label in ((True, "fast"), (False, "reference")):
        encode_paths = dataclasses.replace(fast, encoder=state)
        decode_paths = dataclasses.replace(fast, decoder=state)
        out[f"encoder_{label}_ms"] = median_ms(lambda: model.encode(image, encode_paths), max(3, repeat // 2), device)
        decode = lambda: model.decode(features, queries, paths=decode_paths, check_values=False)  # noqa: E731
        out[f"decoder_{label}_ms"] = median_ms(decode, repeat, device)
    if device.type == "cpu":
        out["linear_fp32_gmacs"] = linear_kernel_rates(model.encoder.channels[0], image.shape[-2:], repeat)
    return out


def linear_kernel_rates(channels: int, image_size, repeat: int) -> dict:
    """GMAC/s of the encoder's first MLP layer ((H/4 * W/4, C) @ (C, 4C)) in fp32 through `F.linear`
    (MKL's sgemm on x86 builds) and through oneDNN (`spd.models.onednn`: why the linears go there),
    and in bf16 through the kernel bf16 linears run here (what bf16 can gain at most on the matmuls).
    oneDNN's fp32 rate is measured wherever its kernel runs, used or not (None where it cannot run)."""
    rows = (image_size[0] // 4) * (image_size[1] // 4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, channels, generator=generator)
    weight, bias = torch.randn(4 * channels, channels, generator=generator), torch.zeros(4 * channels)
    macs = rows * channels * 4 * channels
    low = [t.bfloat16() for t in (x, weight, bias)]
    cpu = torch.device("cpu")
    calls = {"f_linear": lambda: torch.nn.functional.linear(x, weight, bias)}
    if onednn_available() and kernel_problem(torch.float32) is None:  # measured wherever it runs, used or not
        calls["onednn"] = lambda: fused_linear_kernel()(x, weight, bias, "none", [], "")
    calls["bf16"] = lambda: onednn_linear(*low)  # oneDNN where it runs bf16, else F.linear
    with torch.autocast("cpu", enabled=False):
        rates = {name: macs / median_ms(call, repeat, cpu) / 1e6 for name, call in calls.items()}
    return {"shape": [rows, channels, 4 * channels], "onednn": rates.get("onednn"), **rates,
            "bf16_kernel": "oneDNN" if onednn_runs(torch.bfloat16) else "F.linear"}


def count_macs(fn) -> int:
    """Multiply-accumulates of one call (torch's FLOP counter counts 2 per MAC)."""
    register_flop_formula()  # oneDNN's linear counted as the matmul it is (where torch lets us)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def companion_sensitivity(model, features, height: int, width: int, device: torch.device) -> dict[str, float]:
    """How much a point's depth moves with the points that share its decode call: 16 fixed points
    decoded alone (one call each), together (16) and among 240 others (256). Mean |relative change|
    against the 256 case."""
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([width - 1.0, height - 1.0])
    points = (torch.rand(1, 16, 2, generator=generator) * scale).to(device)
    others = (torch.rand(1, 240, 2, generator=generator) * scale).to(device)
    in_256 = model.decode(features, torch.cat([points, others], 1))[:, :16]
    in_16 = model.decode(features, points)
    alone = torch.cat([model.decode(features, points[:, i : i + 1]) for i in range(16)], 1)
    rel = lambda a: float(((a - in_256).abs() / in_256).mean())  # noqa: E731
    return {"alone_vs_256": rel(alone), "in_16_vs_256": rel(in_16)}


@dataclass
class BenchSetup:
    """Both models on one device, one input, and the callables the timings run (eager or compiled)."""

    device: torch.device
    spd_model: torch.nn.Module
    baseline: torch.nn.Module
    image: torch.Tensor
    queries: dict[int, torch.Tensor]
    encode: object
    decode: object
    base_encode: object
    base_decode: object


def model_callables(spd_model, baseline, device: torch.device, compile: bool) -> dict:
    """encode / decode / base_encode / base_decode of both models, eager or both compiled end to end.
    The queries are valid by construction: decode as the predictor does after its one validation."""
    encode, decode = compiled_encode_decode(spd_model, device) if compile else (spd_model.encode, spd_model.decode)
    base_encode, base_decode = compiled_encode_decode(baseline, device) if compile else (baseline.encode, baseline.decode)
    return dict(encode=encode, decode=lambda features, queries: decode(features, queries, check_values=False),
                base_encode=base_encode, base_decode=lambda features, queries: base_decode(features, queries, check_values=False))


def build_setup(height: int, width: int, ks: tuple[int, ...], device: str, compile: bool, baseline_input: str) -> BenchSetup:
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        spd_model = build_model("v15", warn_random_encoder=False).to(dev).eval()
        baseline = DepthAnythingBaseline(input_mode=baseline_input).to(dev).eval()
    image = torch.randn(1, 3, height, width, device=dev)
    scale = torch.tensor([width - 1.0, height - 1.0])
    queries = {k: (torch.rand(1, k, 2, generator=torch.Generator().manual_seed(k)) * scale).to(dev) for k in ks}
    return BenchSetup(dev, spd_model, baseline, image, queries, **model_callables(spd_model, baseline, dev, compile))


def time_models(s: BenchSetup, ks: tuple[int, ...], repeat: int) -> dict:
    """Encode, decode(K) and total(K) medians for SPD, the baseline's total, and paired ratios."""
    result: dict = {"spd": {"decode_ms": {}, "total_ms": {}}, "baseline": {}, "ratio_total": {}, "ratio_decode_encode": {}}
    features = s.encode(s.image)
    result["spd"]["encode_ms"] = median_ms(lambda: s.encode(s.image), repeat, s.device)
    base_total = lambda: s.base_decode(s.base_encode(s.image), s.queries[ks[-1]])  # noqa: E731
    base_total()
    result["baseline"]["total_ms"] = median_ms(base_total, repeat, s.device)
    for k in ks:
        result["spd"]["decode_ms"][str(k)] = median_ms(lambda: s.decode(features, s.queries[k]), repeat, s.device)
        # Totals are timed in alternation with the baseline and the ratios are medians of paired
        # ratios (SPD/baseline, and decode/encode within one SPD call): a shared 2-core machine
        # drifts by 10 % between minutes, which unpaired medians would turn into ratio noise.
        split_spd(s.encode, s.decode, s.image, s.queries[k], s.device)  # warm-up
        runs = [(*split_spd(s.encode, s.decode, s.image, s.queries[k], s.device), median_ms(base_total, 1, s.device, warmup=0))
                for _ in range(repeat)]
        result["spd"]["total_ms"][str(k)] = statistics.median(e + d for e, d, _ in runs)
        result["ratio_total"][str(k)] = statistics.median((e + d) / b for e, d, b in runs)
        result["ratio_decode_encode"][str(k)] = statistics.median(d / e for e, d, _ in runs)
    return result


def macs_summary(s: BenchSetup, ks: tuple[int, ...], k_ref: int) -> tuple[dict, dict]:
    """Decode MACs per K, and per query = the slope of decode MACs in K (what one more query costs);
    the per-call part (the canvas convolutions) is the intercept. Both are reported."""
    features = s.spd_model.encode(s.image)
    decode_macs = {str(k): count_macs(lambda: s.spd_model.decode(features, s.queries[k])) for k in ks}
    k_lo, k_hi = (k_ref, max(ks)) if max(ks) > k_ref else (min(ks), k_ref)
    macs_lo, macs_hi = decode_macs[str(k_lo)], decode_macs[str(k_hi)]
    slope = (macs_hi - macs_lo) / (k_hi - k_lo) if k_hi > k_lo else macs_hi / k_hi
    return decode_macs, {
        "encode": count_macs(lambda: s.spd_model.encode(s.image)),
        "decode_per_query": slope,
        "decode_per_call": macs_lo - slope * k_lo if k_hi > k_lo else None,  # needs two K values
        "decode_amortised_per_query_at_256": decode_macs[str(k_ref)] / k_ref,
        "baseline": count_macs(lambda: s.baseline.encode(s.image)),
    }


def decode_ops_and_syncs(s: BenchSetup, k: int) -> tuple[int, int]:
    """Top-level ops (ATen's and oneDNN's) one decode(K) call issues (each is at least one kernel
    launch on a GPU) and its blocking host syncs (`_local_scalar_dense`, what `.item()`, `bool(tensor)` and `.tolist()` run),
    counted with torch.profiler on a warm call."""
    from torch.profiler import ProfilerActivity, profile

    features = s.spd_model.encode(s.image)
    s.decode(features, s.queries[k])
    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU]) as prof:
        s.decode(features, s.queries[k])
    events = prof.events()

    def is_op(event) -> bool:  # a dispatcher op: aten::add, mkldnn::_linear_pointwise, ...
        return "::" in event.name

    def top_level(event) -> bool:  # an op called from Python, not from inside another op
        return is_op(event) and (event.cpu_parent is None or not is_op(event.cpu_parent))

    ops = sum(1 for e in events if top_level(e))
    return ops, sum(1 for e in events if e.name == "aten::_local_scalar_dense")


@contextlib.contextmanager
def _kineto_quiet():
    """Process-level stderr (fd 2) to /dev/null while torch.profiler starts and stops: its C++ tracer,
    kineto, prints stage markers and, on a machine without a GPU, "gpuGetDeviceCount failed" straight to
    fd 2. They are not errors of the bench; Python-level errors still raise as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_compiled_decode(s: BenchSetup, ks: tuple[int, ...], repeat: int) -> dict[str, float]:
    """decode(K) through `torch.compile(fullgraph=True)`, one static graph per K (CUDA graphs on CUDA)."""
    compiled = compiled_encode_decode(s.spd_model, s.device)[1]
    features = s.encode(s.image)
    out = {}
    for k in ks:
        queries = s.queries[k]
        mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        run = lambda: compiled(features, queries, mask, check_values=False)  # noqa: E731
        out[str(k)] = median_ms(run, repeat, s.device, warmup=3)
    return out


def setup_for_dtype(s: BenchSetup, dtype: str, compile: bool) -> BenchSetup:
    """`s` with both models as they run at `dtype`: for bf16 the copies whose matmul weights are
    stored in bf16 once (`spd.models.precision`), as the predictor and `spd eval` run them."""
    if dtype != "bf16":
        return s
    spd_model, baseline = low_precision_copy(s.spd_model), low_precision_copy(s.baseline)
    return dataclasses.replace(s, spd_model=spd_model, baseline=baseline,
                               **model_callables(spd_model, baseline, s.device, compile))


def paired_total_ratio(first: tuple[BenchSetup, str], second: tuple[BenchSetup, str], k: int, repeat: int) -> float:
    """SPD total(K) at the second setup's dtype over the first's, as the median of `repeat` paired
    ratios, each from one call of each timed back to back (as the SPD/baseline ratios: a shared
    machine drifts by 10 % between minutes, which a ratio of medians timed minutes apart turns into
    noise)."""
    def total(setup: BenchSetup, dtype: str) -> float:
        with _autocast(setup.device, dtype):
            return sum(split_spd(setup.encode, setup.decode, setup.image, setup.queries[k], setup.device))

    total(*first), total(*second)  # warm-up
    return statistics.median(total(*second) / total(*first) for _ in range(repeat))


def throughput(s: BenchSetup, batches: tuple[int, ...], k: int, repeat: int) -> dict:
    """Images per second at batch B: SPD encodes B images in one call and decodes K queries on each in
    one batched call; DAv2-S runs the same B images (dense map, then the same queries). Timed in
    alternation; the ratio is the median of paired ratios, as the totals'. -> {B: figures}."""
    out = {}
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, *s.image.shape[1:], generator=generator).to(s.device)
        queries = s.queries[k].expand(batch, -1, -1).contiguous()
        spd_call = lambda: s.decode(s.encode(images), queries)  # noqa: E731
        base_call = lambda: s.base_decode(s.base_encode(images), queries)  # noqa: E731
        spd_call(), base_call()  # warm-up (and, compiled, the graphs of this batch size)
        runs = [(median_ms(spd_call, 1, s.device, warmup=0), median_ms(base_call, 1, s.device, warmup=0)) for _ in range(repeat)]
        spd_ms, base_ms = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        out[str(batch)] = {"k": k, "spd_images_per_s": batch * 1000 / spd_ms, "baseline_images_per_s": batch * 1000 / base_ms,
                           "spd_over_baseline_images_per_s": statistics.median(b / a for a, b in runs)}
    return out


def cast_counts(s: BenchSetup, dtypes: tuple[str, ...], k: int) -> dict[str, dict[str, int]]:
    """Dtype conversions of one `Predictor` encode and decode(K) per dtype (`spd.bench.casts`: on a GPU
    each is a kernel launch), on the bench's image size, eager."""
    from spd.bench.casts import predictor_casts

    height, width = s.image.shape[-2:]
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    points = s.queries[k][0].cpu().numpy()
    return {dtype: predictor_casts(Predictor(s.spd_model, s.device, dtype=dtype, long_side=None), image, points)
            for dtype in dtypes}


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def run_bench(
    height: int = 480,
    width: int = 640,
    ks: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096),
    device: str = "cpu",
    dtypes: tuple[str, ...] = ("fp32",),
    compile: bool = False,
    repeat: int = 7,
    baseline_input: str = "fair",
    compile_decode_ks: tuple[int, ...] = (),
    train_step: bool = True,
    onnx: bool = False,
    batches: tuple[int, ...] = (1,),
    train_batches: tuple[int, ...] = (1, 6),
) -> dict:
    """Every figure of `spd bench`. The first dtype gives the main rows; each further dtype (bf16)
    its own rows and its total-time ratio to the first, measured in the same run in alternation
    (`paired_total_ratio`). `compile`: both models compiled end to end (`compiled_encode_decode`)."""
    # Compiled: one graph per K and batch size; dynamo's default limit (8 per function) would fall back to eager.
    limit = torch._dynamo.config.patch(recompile_limit=64) if compile else nullcontext()
    with limit:
        return _run_bench(height, width, ks, device, dtypes, compile, repeat, baseline_input, compile_decode_ks,
                          train_step, onnx, batches, train_batches)


def _run_bench(height, width, ks, device, dtypes, compile, repeat, baseline_input, compile_decode_ks, train_step, onnx,
               batches, train_batches) -> dict:
    built = build_setup(height, width, ks, device, compile, baseline_input)
    s = setup_for_dtype(built, dtypes[0], compile)
    dev, primary = s.device, dtypes[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    k_ref = 256 if 256 in ks else ks[-1]
    with torch.inference_mode():
        with _autocast(dev, primary):
            result = time_models(s, ks, repeat)
            result["baseline"]["input_size"] = list(baseline_input_size(height, width, baseline_input))
            fast_paths = measure_fast_paths(s.spd_model, s.image, s.queries[k_ref], k_ref, repeat, dev) if not compile else {}
            result["fast_paths"] = fast_paths
            result["spd"]["decode_macs"], result["macs"] = macs_summary(s, ks, k_ref)
            result["companions"] = companion_sensitivity(s.spd_model, s.spd_model.encode(s.image), height, width, dev)
            result["decode_ops"], result["decode_host_syncs"] = decode_ops_and_syncs(s, k_ref)
            if compile_decode_ks:
                result["spd"]["decode_compiled_ms"] = time_compiled_decode(s, compile_decode_ks, repeat)
            result["throughput"] = {primary: throughput(s, batches, k_ref, repeat)}
        for other in dtypes[1:]:
            with _autocast(dev, other):
                other_setup = setup_for_dtype(built, other, compile)
                result[other] = time_models(other_setup, ks, repeat)
                result[other]["decode_ops"], result[other]["decode_host_syncs"] = decode_ops_and_syncs(other_setup, k_ref)
                result["throughput"][other] = throughput(other_setup, batches, k_ref, repeat)
            result[f"{other}_over_{primary}_total"] = {
                str(k): paired_total_ratio((s, primary), (other_setup, other), k, repeat) for k in ks
            }
        if "bf16" in dtypes[1:]:
            result["bf16_matmul_floor"] = bf16_matmul_floor(result, str(k_ref))
        result["casts"] = {"k": k_ref, **cast_counts(built, dtypes, k_ref)}
    if onnx:
        if dev.type != "cpu":
            raise UserInputError("--backend onnx times ONNX Runtime's CPU provider: use --device cpu")
        from spd.bench.onnx import onnx_section

        result["onnx"] = onnx_section(built.spd_model, built.baseline, built.image, built.queries, repeat,
                                      torch.get_num_threads())
    if train_step:
        result["training_step"] = training_step_sections(device, dtypes, train_batches)
    _add_run_facts(result, s, ks, dtypes, compile, repeat, height, width)
    return result


def bf16_matmul_floor(result: dict, k: str) -> dict | None:
    """The least bf16 SPD total(K) the CPU's measured bf16 GEMM rate allows: every MAC of encode and
    decode(K) (convolutions included) at that rate and nothing else costing anything, and that over
    the first dtype's measured total(K). A lower bound for the bf16 / fp32 total ratio: depthwise
    convolutions, norms and elementwise work run far below the GEMM rate and do cost something.
    None without the rates (not on a CPU with oneDNN, or a compiled run)."""
    rates = (result.get("fast_paths") or {}).get("linear_fp32_gmacs")
    if not rates:
        return None
    macs = result["macs"]["encode"] + result["spd"]["decode_macs"][k]
    floor_ms = macs / rates["bf16"] / 1e6  # GMAC / (GMAC/s) in ms
    return {"k": int(k), "gmacs": macs / 1e9, "bf16_gmac_per_s": rates["bf16"], "ms": floor_ms,
            "over_first_dtype_total": floor_ms / result["spd"]["total_ms"][k]}


def _add_run_facts(result: dict, s: BenchSetup, ks, dtypes, compile, repeat, height, width) -> None:
    dev = s.device
    slower = [k for k in ks if result["ratio_total"][str(k)] >= 1.0]
    result["break_even_k"] = slower[0] if slower else None
    result["peak_memory_mb"] = (
        torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    result.update(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__, threads=torch.get_num_threads(), dtype=dtypes[0], dtypes=list(dtypes), compile=compile,
        height=height, width=width, repeat=repeat, allocator=allocator_setting(), cpu=cpu_facts(), kernels=kernel_facts(),
    )


def format_bench(result: dict) -> str:
    spd, base = result["spd"], result["baseline"]
    lines = [
        f"device {result['device']}, torch {result['torch']}, {result['threads']} threads, {result['dtype']}, "
        f"{'compiled' if result['compile'] else 'eager'}, {result['height']}x{result['width']}, median of {result['repeat']}, "
        f"malloc {result.get('allocator', {}).get('malloc', 'default')}",
        format_machine(result),
        f"SPD encode {spd['encode_ms']:.1f} ms ({result['macs']['encode'] / 1e9:.2f} GMACs); "
        f"baseline DAv2-S total {base['total_ms']:.1f} ms at {base['input_size'][0]}x{base['input_size'][1]} "
        f"({result['macs']['baseline'] / 1e9:.2f} GMACs)",
        (f"decoder MACs per query {result['macs']['decode_per_query'] / 1e6:.2f} M (slope in K) + "
         f"{result['macs']['decode_per_call'] / 1e6:.0f} M per decode call; " if result["macs"]["decode_per_call"] is not None
         else "decoder MACs (one K: no slope); ")
        + f"amortised at K={k_ref_label(result)}: {result['macs']['decode_amortised_per_query_at_256'] / 1e6:.2f} M per query",
        f"{'K':>6}{'decode ms':>12}{'total ms':>12}{'SPD/base':>10}{'dec/enc':>9}{'dec GMACs':>11}",
    ]
    for k in spd["decode_ms"]:
        lines.append(
            f"{k:>6}{spd['decode_ms'][k]:>12.1f}{spd['total_ms'][k]:>12.1f}{result['ratio_total'][k]:>10.2f}"
            f"{result['ratio_decode_encode'][k]:>9.3f}{spd['decode_macs'][k] / 1e9:>11.3f}"
        )
    be = result["break_even_k"]
    lines.append(f"SPD stops being cheaper at K = {be}" if be else "SPD is cheaper than the baseline at every K measured")
    comp = result["companions"]
    lines.append(
        f"companion sensitivity (mean |rel. change| vs decoding among 256): alone {comp['alone_vs_256']:.4f}, "
        f"in 16 {comp['in_16_vs_256']:.4f}"
    )
    fast = result.get("fast_paths") or {}
    if fast:
        lines.append(
            f"fast paths: encode {fast['encoder_fast_ms']:.1f} ms folded vs {fast['encoder_reference_ms']:.1f} ms timm forward; "
            f"decode(K={fast['k']}) {fast['decoder_fast_ms']:.1f} ms vs {fast['decoder_reference_ms']:.1f} ms reference paths"
        )
    rates = fast.get("linear_fp32_gmacs")
    if rates:
        rows, width, hidden = rates["shape"]
        used = result["kernels"]["linear"]["fp32"] if "kernels" in result else "oneDNN"
        onednn = (f"oneDNN {rates['onednn']:.0f} GMAC/s" if rates["onednn"] else "oneDNN does not run here")
        onednn += f" (SPD and DAv2-S use {used})"
        lines.append(f"fp32 linear ({rows} x {width} -> {hidden}, the encoder's first MLP layer): F.linear "
                     f"{rates['f_linear']:.0f} GMAC/s, {onednn}; bf16 {rates['bf16_kernel']} {rates['bf16']:.0f} GMAC/s")
    lines += _format_extras(result)
    if "onnx" in result:
        from spd.bench.onnx import format_onnx

        lines += format_onnx(result["onnx"], result)
    lines.append(f"peak memory {result['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)


def _format_extras(result: dict) -> list[str]:
    """The decoder's op count and syncs, compiled decode, further dtypes, the training step."""
    lines = [f"decode(K={k_ref_label(result)}): {result['decode_ops']} top-level ops, "
             f"{result['decode_host_syncs']} host syncs per call"]
    compiled = result["spd"].get("decode_compiled_ms")
    if compiled:
        lines.append("compiled decode (fullgraph, static K): " + ", ".join(f"K={k} {ms:.2f} ms" for k, ms in compiled.items()))
    for dtype in result.get("dtypes", [])[1:]:
        rows, ratio = result[dtype], result[f"{dtype}_over_{result['dtype']}_total"]
        lines.append(f"{dtype}: SPD encode {rows['spd']['encode_ms']:.1f} ms, "
                     f"baseline total {rows['baseline']['total_ms']:.1f} ms, decode(K={k_ref_label(result)}) "
                     f"{rows['decode_ops']} top-level ops, {rows['decode_host_syncs']} host syncs")
        for k in rows["spd"]["total_ms"]:
            lines.append(f"  K={k:>5}: decode {rows['spd']['decode_ms'][k]:.1f} ms, total {rows['spd']['total_ms'][k]:.1f} ms, "
                         f"SPD/base {rows['ratio_total'][k]:.2f}, {dtype}/{result['dtype']} total {ratio[k]:.2f}")
    floor = result.get("bf16_matmul_floor")
    if floor:
        lines.append(f"  bf16 floor: the {floor['gmacs']:.2f} GMACs of total(K={floor['k']}) at the bf16 GEMM rate above "
                     f"({floor['bf16_gmac_per_s']:.0f} GMAC/s) take {floor['ms']:.1f} ms with nothing else costing anything: "
                     f"bf16/{result['dtype']} total >= {floor['over_first_dtype_total']:.2f}")
    casts = result.get("casts")
    if casts:
        lines.append(f"dtype conversions per Predictor call (K={casts['k']}): " + "; ".join(
            f"{dtype} encode {c['encode']}, decode {c['decode']}" for dtype, c in casts.items() if dtype != "k"))
    for dtype, rows in (result.get("throughput") or {}).items():
        lines.append(f"throughput ({dtype}, K={next(iter(rows.values()))['k']} per image): " + "; ".join(
            f"batch {b}: SPD {t['spd_images_per_s']:.2f} images/s, DAv2-S {t['baseline_images_per_s']:.2f} "
            f"({t['spd_over_baseline_images_per_s']:.2f}x)" for b, t in rows.items()))
    for section in result.get("training_step") or []:
        lines.append(format_training_step(section["dtype"], section))
    return lines


def k_ref_label(result: dict) -> str:
    return "256" if "256" in result["spd"]["decode_macs"] else list(result["spd"]["decode_macs"])[-1]


def save_plot(result: dict, path: str | Path) -> None:
    from spd.vis import _pyplot

    plt = _pyplot()
    ks = [int(k) for k in result["spd"]["total_ms"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ks, [result["spd"]["total_ms"][str(k)] for k in ks], "o-", label="SPD total (encode + decode K)")
    ax.plot(ks, [result["spd"]["decode_ms"][str(k)] for k in ks], "s--", label="SPD decode only")
    ax.axhline(result["baseline"]["total_ms"], color="red", label="DAv2-S dense (any K)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queries per image K")
    ax.set_ylabel("time [ms]")
    ax.set_title(f"{result['height']}x{result['width']}, {result['device']}, {result['dtype']}, "
                 f"{'compiled' if result['compile'] else 'eager'}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)  # beside: no curve hidden
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
