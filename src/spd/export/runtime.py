"""`OnnxPredictor`: the `Predictor` interface on ONNX Runtime, over a folder written by `spd export`.

    from spd import OnnxPredictor
    p = OnnxPredictor("exports/v15_480x640")
    depth_m = p.predict("room.jpg", [[320, 240], [10.5, 400]])

Everything around the graphs is the PyTorch predictor's own code (image reading, normalisation,
point checks, chunks of the training K with the same fixed-seed shuffle), so both backends see the
same inputs. The graphs have a fixed image size: an image of another size with the same aspect ratio
(within 1 %) is resized to it, as the PyTorch predictor resizes large images; anything else is
refused with the exported size named (`resize=False` refuses every other size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from spd.cameras.canonical import DEFAULT_CANONICAL_FOCAL
from spd.errors import SPDError, UserInputError
from spd.export.onnx_export import DECODER_FILE, ENCODER_FILE, FORMAT, FORMAT_VERSION, MANIFEST_FILE
from spd.models.folder import CheckpointError, file_sha256
from spd.predictor import Predictor, grid_points

ASPECT_TOLERANCE = 0.01


def read_manifest(folder: Path) -> dict:
    """The export folder's manifest, checked against its two graph files (present, same SHA-256)."""
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: export folder not found (write one with `spd export`)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {folder} is not an `spd export` folder")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an SPD ONNX manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')!r}, this SPD reads {FORMAT_VERSION}")
    for key, name in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
        entry = manifest.get(key)
        graph = folder / name
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"{path}: no {key} entry with a sha256")
        if not graph.is_file():
            raise CheckpointError(f"{graph}: missing from the export folder")
        if file_sha256(graph) != entry["sha256"]:
            raise CheckpointError(f"{graph}: SHA-256 differs from the manifest's: the file is corrupted or not this export's")
    for key, valid, expected in MANIFEST_FIELDS:
        if key not in manifest:
            raise CheckpointError(f"{path}: no {key!r}")
        if not valid(manifest[key]):
            raise CheckpointError(f"{path}: {key!r} must be {expected}, got {json.dumps(manifest[key])[:80]}")
    return manifest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shape(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_positive_int(v) for v in value)


MANIFEST_FIELDS = (  # (key, check, what it must be): the fields the runtime reads, checked before use
    ("height", _positive_int, "a positive integer"),
    ("width", _positive_int, "a positive integer"),
    ("table_shape", _shape, "a list of positive integers"),
    ("global_kv_shape", _shape, "a list of positive integers"),
    ("spd_config", lambda v: isinstance(v, dict), "an object (the SPD model config)"),
)


class OnnxPredictor(Predictor):
    """`Predictor` (predict, encode, decode, predict_points3d, predict_batch) on ONNX Runtime.

    Args:
        folder: an `spd export` folder (manifest.json, encoder.onnx, decoder.onnx).
        providers: ONNX Runtime execution providers (default CPU).
        chunk_size, seed: as `Predictor` (points per decode call, fixed shuffle of large sets).
        resize: resize images of another size with the exported aspect ratio to the exported size
            (points stay in your pixels); False refuses every size but the exported one.
        threads: ONNX Runtime's intra-op threads (0 = its default, all cores).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, chunk_size: int = 256, seed: int = 0,
                 resize: bool = True, threads: int = 0) -> None:
        ort = import_onnxruntime()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.export_size = (int(self.manifest["height"]), int(self.manifest["width"]))
        options = session_options(ort, threads)
        providers = providers or ["CPUExecutionProvider"]
        self._encoder = _session(ort, self.folder / ENCODER_FILE, options, providers)
        self._decoder = _session(ort, self.folder / DECODER_FILE, options, providers)
        self._check_graphs()
        self.device, self.model, self.dtype = torch.device("cpu"), None, "fp32"
        spd_config = self.manifest.get("spd_config") or {}
        self.canonical_focal = float(spd_config.get("canonical_focal", DEFAULT_CANONICAL_FOCAL))  # older exports: NYU's
        self.chunk_size, self.seed, self.buckets, self.long_side, self.resize = chunk_size, seed, None, None, resize
        self.compile_sizes = None  # one graph: nothing to choose between
        self.trained_on = spd_config.get("trained_on")
        self._decode = self._run_decoder

    def _check_graphs(self) -> None:
        """The sessions' inputs and outputs are the ones the manifest describes."""
        for session, key in ((self._encoder, "encoder"), (self._decoder, "decoder")):
            entry = self.manifest[key]
            names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            if names != (entry.get("inputs"), entry.get("outputs")):
                raise CheckpointError(f"{self.folder / MANIFEST_FILE}: does not match {entry.get('file', key)} "
                                      f"(graph inputs/outputs {names}, manifest {entry.get('inputs')}/{entry.get('outputs')})")
        image_shape = self._encoder.get_inputs()[0].shape
        if list(image_shape[-2:]) != list(self.export_size):
            raise CheckpointError(f"{self.folder / MANIFEST_FILE}: says {self.export_size[0]}x{self.export_size[1]} "
                                  f"but encoder.onnx takes {image_shape[-2]}x{image_shape[-1]} images")
        table_shape = self._decoder.get_inputs()[0].shape
        if list(table_shape) != list(self.manifest["table_shape"]):
            raise CheckpointError(f"{self.folder / MANIFEST_FILE}: table shape {self.manifest['table_shape']} "
                                  f"does not match decoder.onnx's {table_shape}")

    @classmethod
    def from_pretrained(cls, path_or_hub_id, device="cpu", **kwargs) -> "OnnxPredictor":
        return cls(path_or_hub_id, **kwargs)

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """The exported size, for any image of its aspect ratio (UserInputError otherwise, or when resizing is off)."""
        export_h, export_w = self.export_size
        if (height, width) == (export_h, export_w):
            return export_h, export_w
        same_aspect = abs((width / height) / (export_w / export_h) - 1.0) <= ASPECT_TOLERANCE
        if not self.resize or not same_aspect:
            why = "resizing is off" if not self.resize else "its aspect ratio differs"
            raise UserInputError(f"image is {width}x{height} but {self.folder} was exported for {export_w}x{export_h} "
                                 f"images and {why}: resize or crop it, or export at this size "
                                 f"(spd export --height {height} --width {width})")
        return export_h, export_w

    def _encode_tensor(self, tensor: torch.Tensor) -> tuple[np.ndarray, ...]:
        if tensor.shape[0] != 1:  # the exported graphs take one image (batch 1)
            raise UserInputError(f"{self.folder}: the exported encoder takes one image per call, got {tensor.shape[0]}")
        return tuple(self._encoder.run(None, {"image": tensor.numpy()}))

    def predict_batch(self, images, points_list, intrinsics_list=None) -> list[np.ndarray]:
        """One depth array per (image, points[, intrinsics]): each image through the batch-1 graphs, so
        every answer is exactly `predict`'s. (`Predictor.predict_batch` stacks same-size images into
        one encoder call, which these graphs cannot take.)"""
        if len(images) != len(points_list):
            raise UserInputError(f"{len(images)} images but {len(points_list)} point sets")
        if intrinsics_list is not None and len(intrinsics_list) != len(images):
            raise UserInputError(f"{len(images)} images but {len(intrinsics_list)} intrinsics")
        cameras = intrinsics_list if intrinsics_list is not None else [None] * len(images)
        return [self.predict(image, points, camera) for image, points, camera in zip(images, points_list, cameras)]

    def _run_decoder(self, features, queries: torch.Tensor, mask: torch.Tensor, check_values: bool = False) -> torch.Tensor:
        table, keys, values = features
        feed = {"table": table, "global_keys": keys, "global_values": values,
                "queries": queries.numpy(), "mask": mask.numpy()}
        return torch.from_numpy(self._decoder.run(None, feed)[0])


SPIN_ENTRY = "session.intra_op.allow_spinning"


def session_options(ort, threads: int = 0):
    """The ONNX Runtime session options every SPD graph and the benchmarked baseline run with (one
    place, so that a setting that helps one model is used for both): all graph optimisations (ORT's
    default, stated), `threads` intra-op threads (0 = ORT's choice), errors-only logging, and worker
    threads that sleep between runs instead of spinning (ORT's default spins, keeping cores busy after
    each run: on the 2-core Intel Xeon it made SPD's encode + decode(256) no faster, 350 vs 327 ms
    without, and slowed whatever ran next on the machine by ~10 %, `docs/deployment.md`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry(SPIN_ENTRY, "0")
    return options


def describe_session_options(options) -> dict:
    """What `spd bench --backend onnx` reports as the options that ran."""
    return {"graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
            "intra_op_num_threads": options.intra_op_num_threads, "execution_mode": str(options.execution_mode).rsplit(".", 1)[-1],
            "intra_op_allow_spinning": options.get_session_config_entry(SPIN_ENTRY)}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise UserInputError('ONNX Runtime is not installed: pip install "spd[export]" (onnx, onnxruntime, onnxscript)') from err
    return onnxruntime


def _session(ort, path: Path, options, providers):
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0][:200]})") from err


def check_export(model, folder: Path, points: int = 1000, seed: int = 0, name: str | Path | None = None) -> float:
    """Max relative depth difference between ONNX Runtime (the export in `folder`) and PyTorch on a
    random image at `points` random points, decoded in the predictor's chunks. Raises ExportMismatch
    above 1e-3 (fp32 graphs agree to ~1e-5), naming the export `name` (default `folder`)."""
    onnx_predictor = OnnxPredictor(folder)
    height, width = onnx_predictor.export_size
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    where = rng.uniform([0, 0], [width - 1, height - 1], size=(points, 2))
    reference = Predictor(model, long_side=None).predict(image, where)
    exported = onnx_predictor.predict(image, where)
    error = float(np.max(np.abs(exported - reference) / np.abs(reference)))
    if not error <= 1e-3:
        raise ExportMismatch(f"{name or folder}: ONNX Runtime depths differ from PyTorch by up to {error:.1e} (relative): "
                             "the exported graphs are wrong; please report it")
    return error


def relative_depth_change(reference, other, images: list[Path], grid: int) -> dict[str, float]:
    """Mean and max |other - reference| / reference over a grid x grid point grid of each image, for two
    objects with the predictor interface (`predict(rgb, points)`), and the number of images."""
    from spd.data.io import read_rgb

    changes = []
    for image in images:
        rgb = read_rgb(image)
        points = grid_points(grid, *rgb.shape[:2])
        expected = reference.predict(rgb, points)
        changes.append(np.abs(other.predict(rgb, points) - expected) / expected)
    values = np.concatenate(changes)
    return {"mean": float(values.mean()), "max": float(values.max()), "images": len(images)}


INT8_MEAN_CHANGE_LIMIT = 0.05  # mean |int8 - fp32| / fp32 above this: a broken calibration, not rounding


def check_int8_export(model, folder: Path, images: list[Path], grid: int = 32,
                      name: str | Path | None = None) -> dict[str, float]:
    """Mean and max relative depth change of an int8 export (ONNX Runtime) against the fp32 model in
    PyTorch, at a grid x grid point grid of each image (images of the caller's calibration folder held
    out from the calibration: typical of what it will see, and not what the scales were fitted to).
    Raises ExportMismatch, naming the export `name` (default `folder`), when the mean change is above
    5 % (measured ~1 % on real NYU frames; a larger change means the calibration does not cover the inputs)."""
    result = relative_depth_change(Predictor(model), OnnxPredictor(folder), images, grid)
    if not result["mean"] <= INT8_MEAN_CHANGE_LIMIT:
        raise ExportMismatch(f"{name or folder}: the int8 encoder changes depths by {result['mean']:.1%} on average "
                             f"against fp32 on {len(images)} held-out images of your calibration folder: calibrate on "
                             "more, more typical images, or export fp32")
    return result


class ExportMismatch(SPDError):
    exit_code = 1
