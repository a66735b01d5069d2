"""`spd export`: an SPD model as `encoder.onnx` + `decoder.onnx` (K dynamic) + `manifest.json`.

Uses the exporter PyTorch recommends for torch >= 2.5, `torch.onnx.export(..., dynamo=True)`
(torch.export + onnxscript). The graphs are the model's own inference paths (`spd.export.graphs`)
traced with `spd.models.rows.export_ops`: bilinear reads as gathers (no GridSample, which several
runtimes miscompile, and no Loop), canvas writes as ScatterElements-add.

The manifest records what a runtime needs to feed the graphs the same input PyTorch would see
(size, normalisation), the SPD config, and a SHA-256 per graph file; `spd.export.runtime` refuses an
export folder whose files or manifest do not match.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from spd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spd.errors import UserInputError
from spd.export.graphs import DecoderGraph, EncoderGraph
from spd.models.folder import atomic_write, file_sha256
from spd.models.rows import export_ops
from spd.models.spd import SPD

MANIFEST_FILE = "manifest.json"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
FORMAT = "spd-onnx"
FORMAT_VERSION = 1
ENCODER_INPUTS, ENCODER_OUTPUTS = ["image"], ["table", "global_keys", "global_values"]
DECODER_INPUTS, DECODER_OUTPUTS = ["table", "global_keys", "global_values", "queries", "mask"], ["depth"]
MIN_OPSET = 18  # the dynamo exporter's lowest


def export_onnx(
    model: SPD, out_dir: str | Path, height: int, width: int, opset: int | None = None, dtype: str = "fp32",
    source: str | None = None,
) -> Path:
    """Writes `encoder.onnx`, `decoder.onnx` and `manifest.json` for images of height x width pixels.

    Returns the manifest path. `source`: where the model came from (recorded in the manifest). The
    graphs are traced on the CPU in eval mode; `model` is left as it was given (device and every
    module's train / eval mode).
    """
    if dtype != "fp32":
        raise NotImplementedError(f"--dtype {dtype}: only fp32 export is implemented; fp16 graphs are not (yet)")
    if height < 32 or width < 32:
        raise UserInputError(f"export size must be at least 32x32 pixels, got {height}x{width}")
    if opset is not None and opset < MIN_OPSET:
        raise UserInputError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    try:
        return _export_graphs(model.cpu().eval(), out, height, width, opset, dtype, source)
    finally:
        model.to(device)
        for module, training in modes.items():
            module.training = training


def _export_graphs(model: SPD, out: Path, height: int, width: int, opset: int | None, dtype: str,
                   source: str | None) -> Path:
    image = torch.zeros(1, 3, height, width)
    encoder, decoder = EncoderGraph(model), DecoderGraph(model, height, width)
    count = 8  # example K; the graph's K is symbolic (any K >= 1)
    queries = torch.rand(1, count, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([width - 1.0, height - 1.0])
    mask = torch.ones(1, count, dtype=torch.bool)
    k = torch.export.Dim("K", min=1, max=1 << 20)
    with torch.no_grad(), export_ops(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, keys, values = encoder(image)
        _export(encoder, (image,), out / ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS, None, opset)
        _export(decoder, (table, keys, values, queries, mask), out / DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS,
                (None, None, None, {1: k}, {1: k}), opset)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "height": height,
        "width": width,
        "batch": 1,
        "dtype": dtype,
        "opset": _opset_of(out / DECODER_FILE),
        "normalisation": {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "encoder": {"file": ENCODER_FILE, "inputs": ENCODER_INPUTS, "outputs": ENCODER_OUTPUTS,
                    "sha256": file_sha256(out / ENCODER_FILE)},
        "decoder": {"file": DECODER_FILE, "inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS,
                    "sha256": file_sha256(out / DECODER_FILE), "dynamic": {"queries": [1], "mask": [1]}},
        "table_shape": list(table.shape),
        "global_kv_shape": list(keys.shape),
        "spd_config": model.config.to_dict(),
        "source": source,
        "torch": torch.__version__,
    }
    path = out / MANIFEST_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return path


def _export(module, args, path: Path, inputs, outputs, dynamic_shapes, opset: int | None) -> None:
    kwargs = {} if opset is None else {"opset_version": opset}
    program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                dynamic_shapes=dynamic_shapes, verbose=False, **kwargs)
    atomic_write(path, lambda tmp: program.save(str(tmp)))


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

