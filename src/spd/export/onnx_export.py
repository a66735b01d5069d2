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
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from spd.cameras.scale import long_side_of
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


def default_export_size(model: SPD) -> tuple[int, int]:
    """(height, width) at the model's pixel scale in NYU's 4:3 landscape aspect: its long side wide."""
    long_side = long_side_of(model)
    return round(long_side * 3 / 4), long_side


def export_onnx(
    model: SPD, out_dir: str | Path, height: int, width: int, opset: int | None = None, dtype: str = "fp32",
    source: str | None = None, any_scale: bool = False, fold_grn: bool = True,
    before_swap: Callable[[Path], None] | None = None,
) -> Path:
    """Writes `encoder.onnx`, `decoder.onnx` and `manifest.json` for images of height x width pixels.

    The graphs take one image size, so its long side must be the model's pixel scale
    (`spd.cameras.scale`: the model's depths are only metric there); `any_scale` lifts that for
    timing runs, whose depths nobody reads.

    `fold_grn=False` exports the encoder with every fc2's constant weight (`InferencePaths.grn_fold`),
    and `before_swap` is called with the new export's folder once it is written, before it replaces
    `out_dir`: how `spd.export.int8.export_int8` quantises the encoder (a failure there leaves any
    previous export untouched).

    Returns the manifest path. `source`: where the model came from (recorded in the manifest). The
    graphs are traced on the CPU in eval mode; `model` is left as it was given (device and every
    module's train / eval mode).
    """
    if dtype != "fp32":
        raise NotImplementedError(f"--dtype {dtype}: only fp32 export is implemented; fp16 graphs are not (yet)")
    if height < 32 or width < 32:
        raise UserInputError(f"export size must be at least 32x32 pixels, got {height}x{width}")
    long_side = long_side_of(model)
    if not any_scale and max(height, width) != long_side:
        raise UserInputError(f"export size {width}x{height}: this model sees images at {long_side} px long side (its "
                             f"training scale), so export a size with that long side, e.g. --height "
                             f"{round(long_side * 3 / 4)} --width {long_side} (the default)")
    if opset is not None and opset < MIN_OPSET:
        raise UserInputError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer")
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.partial"  # the new export is written whole, then swapped in
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    try:
        _export_graphs(model.cpu().eval(), staging, height, width, opset, dtype, source, fold_grn)
        if before_swap is not None:
            before_swap(staging)
    except BaseException:  # Ctrl-C included: the previous export in `out`, if any, is untouched
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.to(device)
        for module, training in modes.items():
            module.training = training
    _swap_in(staging, out)
    return out / MANIFEST_FILE


def _swap_in(staging: Path, out: Path) -> None:
    """Replaces folder `out` by `staging` with two renames (a crash between them leaves `.<name>.old`
    whole beside the new export, never a mix of two exports' files)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _export_graphs(model: SPD, out: Path, height: int, width: int, opset: int | None, dtype: str,
                   source: str | None, fold_grn: bool = True) -> Path:
    image = torch.zeros(1, 3, height, width)
    encoder, decoder = EncoderGraph(model, fold_grn), DecoderGraph(model, height, width)
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

