"""The user-facing predictor: depth in metres at your pixels, from an image in any common form.

    from spd import Predictor
    p = Predictor.from_pretrained("runs/demo/checkpoints/best", device="cpu")
    depth_m = p.predict("room.jpg", [[320, 240], [10.5, 400]])      # (K,) float32 metres
    feats = p.encode(image); p.decode(feats, points_a); p.decode(feats, points_b)

Points are (u, v) = (column, row) pixels of *your* image, integers at pixel centres; valid points
satisfy -0.5 <= u <= W - 0.5 and -0.5 <= v <= H - 0.5. Preprocessing (RGB conversion, resizing to
the model's pixel scale (`spd.cameras.scale`), ImageNet normalisation, padding to a multiple of 32)
happens inside, so the same scene point gets the same depth whatever size you give the image at.

Depth is for the model's canonical camera (`spd.camera`) unless you give the camera's intrinsics
(fx, fy, cx, cy) in your image's pixels: `p.predict(image, points, intrinsics=(fx, fy, cx, cy))`
returns depth for that camera (the prediction times fx_seen / f_c, fx_seen being fx on the image the
model saw, after any resize).

Queries share information through the model's canvas, so a point's depth depends slightly on
the other points decoded in the same call. Large point sets are therefore shuffled with a fixed
seed and decoded in chunks of `chunk_size` (the training K, 256): every chunk looks like a training
query set, and the same inputs always give the same outputs.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from spd.cameras.canonical import canonical_focal_of, prediction_to_metric
from spd.cameras.scale import long_side_of, scaled_size, to_model_pixels
from spd.chunked import K_BUCKETS, bucket_size, decode_in_chunks, pad_queries
from spd.data.io import NOT_PHOTOGRAPHS, read_rgb
from spd.data.transforms import normalize_image
from spd.errors import UserInputError
from spd.geometry.validation import validate_queries
from spd.cameras.intrinsics import checked_intrinsics, implausible_intrinsics
from spd.models.onednn import onednn_runs
from spd.models.precision import low_precision_copy

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray (H, W, 3) uint8 | torch.Tensor (3, H, W)


@dataclass
class ImageFeatures:
    """Encoder output for one image, reusable by any number of `decode` calls. `height`, `width`: the
    image as the user gave it; `scale` (x, y): the size the model saw over that (1 unless resized)."""

    features: Any
    height: int
    width: int
    scale: tuple[float, float] = (1.0, 1.0)


@dataclass
class PreparedImage:
    """An image sized for the model: `seen` (h, w, 3) uint8 is what the encoder reads; `height`, `width`
    the image as the user gave it (points and intrinsics stay in those pixels)."""

    seen: np.ndarray
    height: int
    width: int


def image_to_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image form -> (H, W, 3) uint8 RGB.

    Accepts a file path, a PIL image (any 8-bit mode), an (H, W, 3) or (H, W) uint8 array, or a tensor
    (3, H, W) / (H, W, 3) that is uint8 or float in [0, 1]. Arrays and tensors are taken as **RGB**
    channel order: an OpenCV image (BGR) must be converted first (`image[..., ::-1]` or
    `cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`); fed as BGR, depths change by 5-11 %.
    """
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        if image.mode in NOT_PHOTOGRAPHS:
            raise UserInputError(f"a {image.mode} image ({NOT_PHOTOGRAPHS[image.mode]}), not an 8-bit colour photograph")
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 3 and tensor.shape[0] == 3 and tensor.shape[-1] != 3:
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: use a path, PIL image, array or tensor")
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UserInputError(f"image must be (H, W, 3) RGB (or (3, H, W) tensor); got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise UserInputError("float images must hold finite values in [0, 1]")
        return np.round(array * 255).astype(np.uint8)
    raise UserInputError(f"image dtype {array.dtype} not supported: use uint8 or float in [0, 1]")


def grid_points(n: int, height: int, width: int) -> np.ndarray:
    """An n x n grid of pixel points over an image, at the centres of n x n equal cells, row by row. (n*n, 2)."""
    u = (np.arange(n) + 0.5) * width / n - 0.5
    v = (np.arange(n) + 0.5) * height / n - 0.5
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu.ravel(), vv.ravel()], -1)


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8, bilinear (PIL, as every backend resizes)."""
    return np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None))


def check_points(points, height: int, width: int) -> torch.Tensor:
    """(K, 2) pixel (u, v) in any array form -> float32 tensor, checked by the model's own rule
    (`validate_queries`); ValueError naming the first bad point."""
    array = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if array.size == 0:
        return torch.zeros(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise UserInputError(f"points must have shape (K, 2) as (u, v) pixels; got shape {array.shape}")
    queries = torch.from_numpy(array)
    validate_queries(queries[None], (height, width), noun="point")  # float64: the check sees the user's values
    return torch.from_numpy(array.astype(np.float32))  # in numpy: no tensor cast op (`spd.bench.casts`)


def copy_tensors(value, _copies: dict | None = None):
    """A copy of every tensor in a (nested) dataclass / list / tuple, the rest shared: features made by a
    CUDA graph, whose output memory its next replay overwrites.

    Copied storage by storage, not tensor by tensor: tensors that are views of one storage (the row
    table and the maps inside it, `spd.models.rows`) become views of one copy of it, so the copy
    takes exactly the bytes of what it copies (a clone per view took 3.8x)."""
    copies = {} if _copies is None else _copies  # storage address -> its copy
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), value.device)
        if key not in copies:
            source = torch.empty(0, dtype=torch.uint8, device=value.device).set_(storage)
            copies[key] = source.clone().untyped_storage()
        copy = torch.empty(0, dtype=value.dtype, device=value.device)
        return copy.set_(copies[key], value.storage_offset(), value.size(), value.stride())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: copy_tensors(getattr(value, f.name), copies) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, (list, tuple)):
        return type(value)(copy_tensors(v, copies) for v in value)
    return value


def compiled_encode_decode(model: torch.nn.Module, device: torch.device) -> tuple:
    """(encode, decode) of `model` as `Predictor(compile=True)` runs them (and `spd bench --compile`
    times them): fullgraph, static shapes (one graph per image size and per K), CUDA graphs on CUDA,
    where the encoder's outputs are copied out: its next replay overwrites their memory."""
    mode = "reduce-overhead" if device.type == "cuda" else None  # reduce-overhead = CUDA graphs
    encode = torch.compile(model.encode, fullgraph=True, dynamic=False, mode=mode)
    decode = torch.compile(model.decode, fullgraph=True, dynamic=False, mode=mode)
    if device.type == "cuda":
        return (lambda images: copy_tensors(encode(images))), decode
    return encode, decode


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, h, w) float32, ImageNet-normalised."""
    return normalize_image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))


def _seen_scale(prepared: PreparedImage) -> tuple[float, float]:
    """(x, y) size the model sees over the size the caller gave."""
    return prepared.seen.shape[1] / prepared.width, prepared.seen.shape[0] / prepared.height


def _to_numpy(depth: torch.Tensor) -> np.ndarray:
    """float32 numpy on the host, with no op where the tensor is that already."""
    return on_device(depth if depth.dtype == torch.float32 else depth.float(), torch.device("cpu")).numpy()


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on `device`, with no op at all when it is there already (a no-op `.to` still dispatches)."""
    return tensor if tensor.device == device else tensor.to(device)


def backproject(points: np.ndarray, depth: np.ndarray, intrinsics: Sequence[float]) -> np.ndarray:
    """Pixel (u, v) + z-depth [m] -> camera-frame (X, Y, Z) [m] (OpenCV axes: x right, y down).

    intrinsics: (fx, fy, cx, cy) in pixels of the same image. Returns (K, 3) float32.
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    z = np.asarray(depth, dtype=np.float64)
    return np.stack([(points[:, 0] - cx) / fx * z, (points[:, 1] - cy) / fy * z, z], -1).astype(np.float32)


class Predictor:
    """Wraps a model with `encode` / `decode` (SPD or the baseline) for single images.

    Args:
        model: the network; it is moved to `device` and put in eval mode.
        chunk_size: points per decode call (the training K).
        seed: the fixed shuffle of large point sets (see module docstring).
        dtype: "fp32", or "bf16" (autocast: matmuls and convolutions in bf16; coordinates, softmax,
            normalisation and the final exp stay fp32). A bf16 predictor runs a copy of the model
            with those weights stored in bf16 once (`spd.models.precision`); `model` is unchanged.
        compile: the whole predictor through `torch.compile(fullgraph=True, dynamic=False)`, as CUDA
            graphs on CUDA: encode compiles once per image size the model sees (a camera stream has
            one), decode once per K bucket: each chunk is padded to a bucket (`spd.chunked.K_BUCKETS`)
            so only a few shapes ever compile. The first call of each shape compiles (seconds to a minute).
        buckets: override the K buckets (None: K_BUCKETS when compiling, exact sizes otherwise).
        compile_sizes: with `compile`, the (h, w) sizes the model sees that run compiled; images the model
            sees at any other size run eager (the same maths), so a new size never stalls a caller on a
            compile. None: every size compiles on first use. `warm_up()` compiles them all up front.
        long_side: every image is resized to this long side before encoding; "model" (default): the
            model's pixel scale, the long side of its training frames (`spd.cameras.scale`: metric
            depth depends on it; a 4000x3000 photo at full size would also cost ~70x the time).
            Points and intrinsics stay in the user's pixels: they are mapped onto the resized image.
            None: never resize (the caller has sized the image).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        chunk_size: int = 256,
        seed: int = 0,
        dtype: Literal["fp32", "bf16"] = "fp32",
        compile: bool = False,
        buckets: tuple[int, ...] | None = None,
        long_side: int | None | Literal["model"] = "model",
        compile_sizes: Sequence[tuple[int, int]] | None = None,
    ):
        if dtype not in ("fp32", "bf16"):
            raise UserInputError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if dtype == "bf16":
            self.model = low_precision_copy(self.model)
        if self.device.type == "cpu":  # the CPU kernel routing (one probe call per dtype) decided now, not in a first call
            for kernel_dtype in {torch.float32, torch.bfloat16 if dtype == "bf16" else torch.float32}:
                onednn_runs(kernel_dtype)
        self.chunk_size = chunk_size
        self.seed = seed
        self.dtype = dtype
        self._encode, self._decode = (compiled_encode_decode(self.model, self.device) if compile
                                      else (self.model.encode, self.model.decode))
        if buckets is None and compile:
            buckets = tuple(b for b in K_BUCKETS if b < chunk_size) + (chunk_size,)
        self.buckets = buckets
        if compile_sizes is not None and not compile:
            raise UserInputError("compile_sizes applies to a compiled predictor (compile=True)")
        self.compile_sizes = None if compile_sizes is None else {tuple(int(v) for v in size) for size in compile_sizes}
        if long_side == "model":
            long_side = long_side_of(model)
        if long_side is not None and long_side < 32:
            raise UserInputError(f"long_side must be at least 32 pixels, got {long_side}")
        self.long_side = long_side
        self.canonical_focal = canonical_focal_of(model)
        # what the model was trained on (spd.data.provenance; None: unknown), for callers to say
        self.trained_on = getattr(getattr(model, "config", None), "trained_on", None)

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, device: str | torch.device = "cpu", **kwargs) -> "Predictor":
        """A model folder (`config.json` + `model.safetensors`) or a Hugging Face Hub id."""
        from spd.models.spd import load_model

        return cls(load_model(path_or_hub_id, device), device, **kwargs)

    @torch.inference_mode()
    def encode(self, image: ImageLike) -> ImageFeatures:
        return self.encode_prepared(self.prepare(image))

    def prepare(self, image: ImageLike) -> PreparedImage:
        """The image as the model will see it (resized to its scale), with the caller's size: the part of
        `encode` that needs no model (a server runs it in its decoding pool)."""
        rgb = image_to_uint8(image)
        height, width = rgb.shape[:2]
        new_h, new_w = self.model_size(height, width)
        seen = rgb if (new_h, new_w) == (height, width) else resize_rgb(rgb, new_h, new_w)
        return PreparedImage(seen, height, width)

    @torch.inference_mode()
    def encode_prepared(self, prepared: PreparedImage) -> ImageFeatures:
        """`encode` of an image `prepare` (or an equivalent decoder) has sized for the model."""
        features = self._encode_tensor(_normalised(prepared.seen)[None])
        return ImageFeatures(features, prepared.height, prepared.width, _seen_scale(prepared))

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees for an image of height x width: resized to `long_side` (the model's scale)."""
        return scaled_size(height, width, self.long_side)

    def _compiled(self, size) -> bool:
        """Whether images the model sees at (h, w) = `size` run the compiled graphs."""
        return self.compile_sizes is None or tuple(size) in self.compile_sizes

    @torch.inference_mode()
    def _encode_tensor(self, tensor: torch.Tensor):
        """(B, 3, h, w) normalised -> the model's features."""
        encode = self._encode if self._compiled(tensor.shape[-2:]) else self.model.encode
        with self._autocast():
            return encode(on_device(tensor, self.device))

    def _decode_for(self, features):
        """The decode callable for features of this image size (compiled, or the eager one)."""
        size = getattr(features, "image_size", None)
        return self._decode if size is None or self._compiled(size) else self.model.decode

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles every graph a compiled predictor with `compile_sizes` will run (encode per size, decode
        per K bucket) now, so that no caller waits on a compile later."""
        if self.compile_sizes is None:
            raise UserInputError("warm_up needs compile_sizes (the image sizes to compile for)")
        for height, width in sorted(self.compile_sizes):
            features = self._encode_tensor(torch.zeros(1, 3, height, width))
            for k in self.buckets:
                queries = torch.zeros(1, k, 2, device=self.device)
                with self._autocast():
                    self._decode(features, queries, torch.ones(1, k, dtype=torch.bool, device=self.device),
                                 check_values=False)

    @torch.inference_mode()
    def decode(self, features: ImageFeatures, points, intrinsics: Sequence[float] | None = None) -> np.ndarray:
        """Depth [m] at (K, 2) points of the encoded image, for the camera of `intrinsics` (fx, fy, cx,
        cy in the image's pixels; None: the model's canonical camera). Returns (K,) float32."""
        queries = check_points(points, features.height, features.width)  # validated once, in the user's pixels
        if intrinsics is not None:
            intrinsics = checked_intrinsics(intrinsics, "intrinsics")
            problem = implausible_intrinsics(intrinsics, features.height, features.width)
            if problem is not None:  # a likely mistake, said once per call; the depths follow the rule as given
                warnings.warn(f"spd: {problem}", UserWarning, stacklevel=2)
        queries = on_device(to_model_pixels(queries, features.scale), self.device)
        with self._autocast():
            depth = decode_in_chunks(self.model, features.features, queries, self.chunk_size, shuffle_seed=self.seed,
                                     buckets=self.buckets, decode=self._decode_for(features.features))
        return self._metric(_to_numpy(depth), intrinsics, features.scale)

    def _metric(self, depth: np.ndarray, intrinsics: Sequence[float] | None, scale: tuple[float, float]) -> np.ndarray:
        """The model's canonical-camera depth -> metres for the camera of `intrinsics` (checked)."""
        seen_focal = intrinsics[0] * scale[0] if intrinsics is not None else None  # fx on the model's image
        return prediction_to_metric(depth, seen_focal, self.canonical_focal).astype(np.float32)

    def predict(self, image: ImageLike, points, intrinsics: Sequence[float] | None = None) -> np.ndarray:
        """Depth [m] at (K, 2) pixel points, for the camera of `intrinsics` (None: the canonical one,
        see the module docstring). Returns (K,) float32."""
        return self.decode(self.encode(image), points, intrinsics)

    def predict_points3d(self, image: ImageLike, points, intrinsics: Sequence[float]) -> np.ndarray:
        """Camera-frame 3-D points [m] at (K, 2) pixels; intrinsics (fx, fy, cx, cy) in pixels. (K, 3)."""
        features = self.encode(image)
        depth = self.decode(features, points, intrinsics)
        return backproject(check_points(points, features.height, features.width).numpy(), depth, intrinsics)

    def predict_batch(self, images: Sequence[ImageLike], points_list: Sequence,
                      intrinsics_list: Sequence | None = None) -> list[np.ndarray]:
        """One depth array per (image, points[, intrinsics]) triple; each image is encoded once."""
        if len(images) != len(points_list):
            raise UserInputError(f"{len(images)} images but {len(points_list)} point sets")
        if intrinsics_list is not None and len(intrinsics_list) != len(images):
            raise UserInputError(f"{len(images)} images but {len(intrinsics_list)} intrinsics")
        cameras = [None if c is None else checked_intrinsics(c, "intrinsics")
                   for c in (intrinsics_list if intrinsics_list is not None else [None] * len(images))]
        prepared = [self.prepare(image) for image in images]
        queries = [check_points(points, image.height, image.width) for points, image in zip(points_list, prepared)]
        groups: dict[tuple[int, ...], list[int]] = {}  # images the model sees at one size
        for index, image in enumerate(prepared):
            groups.setdefault(image.seen.shape, []).append(index)
        depths: list[np.ndarray] = [np.zeros(0, np.float32)] * len(images)
        for members in groups.values():
            if len(members) == 1 or max(queries[i].shape[0] for i in members) > self.chunk_size:
                for i in members:  # one by one, large sets in chunks: exactly `predict`
                    depths[i] = self.decode(self.encode_prepared(prepared[i]), points_list[i], cameras[i])
                continue
            features = self._encode_tensor(torch.stack([_normalised(prepared[i].seen) for i in members]))
            scales = [_seen_scale(prepared[i]) for i in members]
            seen = [on_device(to_model_pixels(queries[i], scale), self.device) for i, scale in zip(members, scales)]
            for i, depth, scale in zip(members, self._decode_batch(features, seen), scales):
                depths[i] = self._metric(depth, cameras[i], scale)
        return depths

    @torch.inference_mode()
    def _decode_batch(self, features, queries: list[torch.Tensor]) -> list[np.ndarray]:
        """Depth (canonical camera) at each image's (K_b, 2) model-pixel queries, K_b <= chunk_size, in one
        decode call of (B, K) padded with masked queries (K = the largest K_b, or its bucket)."""
        counts = [q.shape[0] for q in queries]
        if max(counts) == 0:
            return [np.zeros(0, np.float32) for _ in queries]
        padded, mask = pad_queries(queries, bucket_size(max(counts), self.buckets) if self.buckets else max(counts))
        with self._autocast():
            depth = _to_numpy(self._decode_for(features)(features, padded, mask, check_values=False))
        return [depth[row, :count] for row, count in enumerate(counts)]
