"""`spd bench --backend onnx`: both models exported and timed on ONNX Runtime, as the PyTorch rows.

SPD goes through `spd export` (encoder.onnx + decoder.onnx); the DAv2-S baseline is exported the
same way (dynamo exporter, fp32) as one graph image + queries -> depth at the queries (its dense
forward, then the bilinear read), its attention in the form ONNX Runtime runs best
(`plain_attention`), as SPD's graphs take theirs. Same image, same queries, same ORT session options
for both.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spd.bench.onnx_profile import format_profile, op_type_times, top_ops
from spd.bench.train_step import median_ms
from spd.export.onnx_export import export_onnx

CPU = torch.device("cpu")  # ONNX Runtime's CPU provider


class BaselineGraph(nn.Module):
    """image (1, 3, H, W), queries (1, K, 2) -> depth (1, K): the baseline's whole forward."""

    def __init__(self, baseline: nn.Module) -> None:
        super().__init__()
        self.baseline = baseline

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        return self.baseline.decode(self.baseline.encode(image), queries, mask, check_values=False)


@contextmanager
def plain_attention(baseline: nn.Module) -> Iterator[None]:
    """Within this block DINOv2's attention runs as transformers' eager form (MatMul, Softmax, MatMul)
    instead of `scaled_dot_product_attention`, which the ONNX exporter writes with a guard for fully
    masked rows: IsNaN and Where over every attention matrix (6 heads x 1564^2 per layer at 476x644),
    which an unmasked ViT never needs and which took ~22 % of DAv2-S's ONNX Runtime time (measured
    on the AMD EPYC Zen 4: 1095 ms with the guard, 893 ms without; same depths to 2e-7). PyTorch keeps
    SDPA, its fastest form there. Older transformers without `set_attn_implementation` keep SDPA."""
    backbone = getattr(getattr(baseline, "net", None), "backbone", None)
    switch = getattr(backbone, "set_attn_implementation", None)
    if switch is None:
        yield
        return
    previous = backbone.config._attn_implementation
    switch("eager")
    try:
        yield
    finally:
        switch(previous)


def export_baseline(baseline: nn.Module, path: Path, height: int, width: int) -> None:
    image = torch.zeros(1, 3, height, width)
    queries = torch.rand(1, 8, 2) * torch.tensor([width - 1.0, height - 1.0])
    k = torch.export.Dim("K", min=1, max=1 << 20)
    with torch.no_grad(), warnings.catch_warnings(), plain_attention(baseline):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(BaselineGraph(baseline.cpu().eval()), (image, queries), dynamo=True,
                                    input_names=["image", "queries"], output_names=["depth"],
                                    dynamic_shapes=({}, {1: k}), verbose=False)
    program.save(str(path))


def onnx_section(spd_model, baseline, image: torch.Tensor, queries: dict[int, torch.Tensor], repeat: int,
                 threads: int) -> dict:
    """ONNX Runtime rows: SPD encode, decode(K), total(K) paired with the baseline's total(K) and with PyTorch
    eager's total(K) in the same rounds (ratios of paired runs), and ORT's profile of both SPD graphs."""
    import onnxruntime as ort

    from spd.export.runtime import OnnxPredictor, describe_session_options, session_options

    height, width = image.shape[-2:]
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(spd_model, tmp, height, width, any_scale=True)  # timing only
        export_baseline(baseline, Path(tmp) / "baseline.onnx", height, width)
        predictor = OnnxPredictor(tmp, threads=threads)
        options = session_options(ort, threads)  # the predictor's own options: the same for both models
        base_session = ort.InferenceSession(str(Path(tmp) / "baseline.onnx"), options, providers=["CPUExecutionProvider"])
        image_np = image.cpu().numpy()
        encode = lambda: predictor._encode_tensor(image.cpu())  # noqa: E731
        features = encode()
        result: dict = {"spd": {"decode_ms": {}, "total_ms": {}}, "baseline": {}, "ratio_total": {}, "threads": threads,
                        "session_options": describe_session_options(options)}
        result["spd"]["encode_ms"] = median_ms(encode, repeat, CPU)
        for k, q in queries.items():
            q = q.cpu()
            mask = torch.ones(q.shape[:2], dtype=torch.bool)
            decode = lambda: predictor._run_decoder(features, q, mask)  # noqa: E731
            base = lambda: base_session.run(None, {"image": image_np, "queries": q.numpy()})  # noqa: E731
            result["spd"]["decode_ms"][str(k)] = median_ms(decode, repeat, CPU)
            eager = lambda: spd_model.decode(spd_model.encode(image), q, check_values=False)  # noqa: E731
            base()
            with torch.inference_mode():
                eager()
                # One ORT total, one DAv2-S total and one PyTorch eager total per round: both ratios are
                # medians of paired runs, so a shared machine's drift does not fall between sections.
                runs = [(median_ms(lambda: predictor._run_decoder(encode(), q, mask), 1, CPU, 0), median_ms(base, 1, CPU, 0),
                         median_ms(eager, 1, CPU, 0)) for _ in range(repeat)]
            result["spd"]["total_ms"][str(k)] = statistics.median(t for t, _, _ in runs)
            result["baseline"].setdefault("total_ms_by_k", {})[str(k)] = statistics.median(b for _, b, _ in runs)
            result["ratio_total"][str(k)] = statistics.median(t / b for t, b, _ in runs)
            result.setdefault("ratio_to_pytorch", {})[str(k)] = statistics.median(t / e for t, _, e in runs)
        result["baseline"]["total_ms"] = statistics.median(result["baseline"]["total_ms_by_k"].values())
        result["profile"] = _profile_spd(ort, Path(tmp), threads, image, features, queries)
    return result


def _profile_spd(ort, folder: Path, threads: int, image: torch.Tensor, features, queries: dict) -> dict:
    """ORT's profiler on the encoder and on the decoder at each K: node time and top op types."""
    from spd.export.onnx_export import DECODER_FILE, ENCODER_FILE
    from spd.export.runtime import session_options

    table, keys, values = features
    feeds = {"encoder": (ENCODER_FILE, {"image": image.cpu().numpy()})}
    for k, q in queries.items():
        feeds[f"decoder K={k}"] = (DECODER_FILE, {"table": table, "global_keys": keys, "global_values": values,
                                                  "queries": q.cpu().numpy(), "mask": np.ones(q.shape[:2], dtype=bool)})
    profile = {}
    for name, (graph, feed) in feeds.items():
        times = op_type_times(ort, folder / graph, session_options(ort, threads), feed)
        profile[name] = {"node_ms": round(sum(times.values()), 2), "top": top_ops(times)}
    return profile


def format_onnx(section: dict, torch_result: dict) -> list[str]:
    spd, base = section["spd"], section["baseline"]
    options = ", ".join(f"{k} {v}" for k, v in section.get("session_options", {}).items())
    lines = [f"ONNX Runtime (CPU, {section['threads'] or 'default'} threads, fp32): SPD encode {spd['encode_ms']:.1f} ms, "
             f"DAv2-S total {base['total_ms']:.1f} ms; session options: {options}"]
    for k in spd["decode_ms"]:
        torch_total = torch_result["spd"]["total_ms"].get(k)
        versus = ""
        if torch_total:
            versus = f", PyTorch eager total {torch_total:.1f} ms (ORT/PyTorch {spd['total_ms'][k] / torch_total:.2f}"
            if "ratio_to_pytorch" in section:
                # Paired rounds alternate the runtimes in one process (ORT's threads sleep between runs,
                # `session_options`, so neither slows the other); the sections' ratio takes the machine's
                # drift between sections instead. Both are shown.
                versus += f"; {section['ratio_to_pytorch'][k]:.2f} in paired rounds"
            versus += ")"
        lines.append(f"  K={k:>5}: decode {spd['decode_ms'][k]:.1f} ms, total {spd['total_ms'][k]:.1f} ms, "
                     f"SPD/base {section['ratio_total'][k]:.2f}{versus}")
    return lines + format_profile(section.get("profile", {}))

