"""int8 encoder for ONNX Runtime (`spd export --int8 --calibration DIR`): ONNX Runtime's static
quantisation (`quantize_static`: QDQ, per-channel int8 weights in 7 bits, uint8 activations, MinMax
calibration on the caller's images) of the encoder's constant-weight Conv / MatMul / Gemm nodes. The decoder, and
every norm, GELU, GRN and add of the encoder, stay fp32.

The encoder is exported with GRN applied to the activation (`InferencePaths.grn_fold=False`) so that
every fc2 keeps its constant weight: with GRN folded into a per-image weight, fc2 (half of the MLP
matmuls) cannot be quantised per channel. Measured on an AMD EPYC Zen 4 (docs/deployment.md): v15 at
480x640, total(256) 1.64x the fp32 export's speed this way, 1.31x with fc2 left in fp32; abs_rel on the
demo model's held-out rooms +0.3 % of fp32's. `python -m spd.experiments.int8` measures it on your
CPU and images.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from spd.errors import UserInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

QUANTIZED_OPS = {
    "weights": "Conv, MatMul and Gemm nodes with a constant weight (what int8 kernels speed up); everything else fp32",
    "all": "ONNX Runtime's default: every op type it can quantise (activations of norms, GELU, adds, ... too)",
}


def _depth_map(path: Path) -> bool:
    """A 16-bit or float image (its header says so): a depth map, not a photograph to calibrate on."""
    from PIL import Image, UnidentifiedImageError

    from spd.data.io import NOT_PHOTOGRAPHS

    try:
        with Image.open(path) as image:
            return image.mode in NOT_PHOTOGRAPHS
    except (UnidentifiedImageError, OSError):
        return False  # unreadable: `read_rgb` names it when the calibration reads it


def calibration_images(folder: str | Path, limit: int) -> list[Path]:
    """The first `limit` .jpg / .png photographs under `folder` (searched recursively, sorted; 16-bit
    depth maps skipped): a clear error when the folder is missing or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise UserInputError(f"--calibration {folder}: not a folder (give a folder of typical .jpg / .png images)")
    images = [p for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
              if not _depth_map(p)][:limit]  # the NYU layout keeps 16-bit depth PNGs beside the RGB
    if not images:
        raise UserInputError(f"--calibration {folder}: no .jpg / .png images to calibrate on")
    return images


def encoder_input(predictor, image) -> np.ndarray:
    """(1, 3, h, w) float32: the image resized to the export and normalised, as `OnnxPredictor` feeds it."""
    import torch

    from spd.data.transforms import normalize_image

    from spd.data.io import read_rgb

    rgb = read_rgb(image)
    try:
        seen = predictor.prepare(rgb).seen
    except UserInputError:  # its message names the (staging) export folder; name the image instead
        height, width = predictor.export_size
        raise UserInputError(f"--calibration {image}: {rgb.shape[1]}x{rgb.shape[0]} has not the export's aspect ratio "
                             f"({width}x{height}); calibrate on images shaped like the ones the export will see") from None
    return normalize_image(torch.from_numpy(np.ascontiguousarray(seen)).permute(2, 0, 1))[None].numpy()


def calibration_reader(predictor, images: list[Path]):
    """An ONNX Runtime CalibrationDataReader feeding each image as the encoder reads it."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(images)

        def get_next(self):
            path = next(self._feeds, None)
            return None if path is None else {"image": encoder_input(predictor, path)}

    return Reader()


def matmuls_without_constant_weight(model) -> list[str]:
    """Names of the MatMul / Gemm nodes of an ONNX model whose second input is not a constant (fc2 with
    GRN folded into a per-image weight; products of two activations) or whose first is (GRN's row of
    ones): left in fp32, since their 'weight' would be quantised per tensor, per image."""
    constants = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type in ("MatMul", "Gemm")
            and (node.input[1] not in constants or node.input[0] in constants)]


def export_int8(model, out_dir: str | Path, height: int, width: int, calibration: list[Path],
                check=None, **export_args) -> Path:
    """`spd.export.onnx_export.export_onnx` with an int8 encoder: exported with GRN unfolded, then
    quantised on `calibration` images and, when given, `check(folder)`ed before the folder is swapped
    in (a failed check leaves the previous export as it was). Returns the manifest path."""
    from spd.export.onnx_export import export_onnx

    def quantize_and_check(folder: Path) -> None:
        quantize_encoder(folder, calibration)
        if check is not None:
            check(folder)

    return export_onnx(model, out_dir, height, width, fold_grn=False, before_swap=quantize_and_check, **export_args)


def split_calibration(images: list[Path], calibrate: int, check: int = 4) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out check images): the first `calibrate` calibrate and up to `check`
    after them are held out; a folder with no more than `calibrate` images gives a fifth of them (at
    least one) to the check. UserInputError for a single image: nothing would be left to check on."""
    if len(images) < 2:
        raise UserInputError(f"--calibration: {len(images)} image; int8 needs at least 2 (one is held out to check "
                             "the export on an image it was not calibrated on)")
    if len(images) > calibrate:
        return images[:calibrate], images[calibrate:calibrate + check]
    held_out = max(1, len(images) // 5)
    return images[:-held_out], images[-held_out:]


def quantize_encoder(export: Path, calibration: list[Path], ops: str = "weights") -> None:
    """Replaces `export`'s encoder.onnx by its int8 (QDQ) form, calibrated on `calibration` images as
    the export reads them, and records it in the manifest (new checksum, `encoder_quantization`).
    `ops`: which nodes are quantised (`QUANTIZED_OPS`)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from spd.export.onnx_export import ENCODER_FILE, MANIFEST_FILE
    from spd.export.runtime import OnnxPredictor
    from spd.models.folder import file_sha256

    encoder = export / ENCODER_FILE
    reader = calibration_reader(OnnxPredictor(export), calibration)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(encoder), str(prepared))
        selection = {}
        if ops == "weights":
            selection = {"op_types_to_quantize": ["Conv", "MatMul", "Gemm"],
                         "nodes_to_exclude": matmuls_without_constant_weight(onnx.load(str(prepared)))}
        # reduce_range: weights in 7 bits. x86 CPUs without VNNI (AVX2 laptops, older Xeons) multiply uint8
        # activations by int8 weights with an instruction whose 16-bit pair sums saturate at full range,
        # silently wrong depths on exactly the CPUs the export cannot be checked on here. Measured on the
        # AMD Zen 4 (VNNI): 4 % slower, demo abs_rel +0.3 % against +0.2 % at 8 bits.
        quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **selection)
        shutil.move(str(quantized), str(encoder))  # /tmp may be another file system
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    manifest["encoder"]["sha256"] = file_sha256(encoder)
    manifest["encoder_quantization"] = (f"int8 QDQ ({ops}: {QUANTIZED_OPS[ops]}), per-channel 7-bit weights, "
                                        f"uint8 activations, calibrated on {len(calibration)} images")
    (export / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
