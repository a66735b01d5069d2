"""Procedural indoor scenes written in the NYU / BTS layout, so everything runs with no download.

Each frame is a ray-cast room: floor, walls and ceiling at random distances, axis-aligned boxes
(furniture) and spheres, procedural textures (stripes, tiles, grain, noise), a point light with
Lambertian shading and distance fall-off, and the NYU camera (fx = 518.8579 at 640 px wide, scaled
with the image) or any pinhole camera you give (`intrinsics`). Depth is the exact z-depth of the
first hit, written as uint16 millimetres, with optional Kinect-like holes (blobs and shadows along
depth edges). Frame i of a split depends only
on (seed, split, i), so the output is deterministic whatever the worker count.

Layout (like BTS NYU):
    OUT/sync/<scene>/rgb_00000.jpg, sync_depth_00000.png     + OUT/train_files.txt (relative to OUT/sync)
    OUT/official_splits/test/<scene>/...                       + OUT/test_files.txt (relative to OUT/official_splits/test)
    OUT/train_images.txt: the training RGB files alone (relative to OUT), as unlabelled images
"""

from __future__ import annotations

import json
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from spd.data.io import NYU_INTRINSICS, write_depth_png

TRAIN_DIR = "sync"
TEST_DIR = "official_splits/test"


@dataclass
class Hit:
    """Nearest surface per pixel. t: (N,) z-depth; normal: (N, 3); surface: (N,) int id."""

    t: np.ndarray
    normal: np.ndarray
    surface: np.ndarray


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_yaw @ r_pitch @ r_roll


def _intersect_room(origin, dirs, room) -> Hit:
    """Inside of the box [0, room]: per axis, the wall the ray heads for."""
    safe = np.where(np.abs(dirs) < 1e-9, 1e-9, dirs)
    t_axes = np.where(safe > 0, (room - origin) / safe, -origin / safe)  # (N, 3)
    axis = np.argmin(t_axes, axis=1)
    t = t_axes[np.arange(len(t_axes)), axis]
    sign = np.where(safe[np.arange(len(safe)), axis] > 0, -1.0, 1.0)  # inward-facing normal
    normal = np.zeros_like(dirs)
    normal[np.arange(len(dirs)), axis] = sign
    surface = axis * 2 + (sign < 0)  # 0..5: x-min, x-max, floor, ceiling, z-min, z-max
    return Hit(t, normal, surface)


def _intersect_box(origin, dirs, lo, hi):
    safe = np.where(np.abs(dirs) < 1e-9, 1e-9, dirs)
    t1, t2 = (lo - origin) / safe, (hi - origin) / safe
    near = np.minimum(t1, t2)
    t_near, t_far = near.max(1), np.maximum(t1, t2).min(1)
    hit = (t_near < t_far) & (t_near > 1e-3)
    axis = near.argmax(1)
    normal = np.zeros_like(dirs)
    normal[np.arange(len(dirs)), axis] = -np.sign(safe[np.arange(len(dirs)), axis])
    return np.where(hit, t_near, np.inf), normal


def _intersect_sphere(origin, dirs, center, radius):
    oc = origin - center
    a = (dirs * dirs).sum(1)
    b = 2 * (dirs @ oc)
    c = oc @ oc - radius**2
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    t = np.where((disc > 0) & (t > 1e-3), t, np.inf)
    points = origin + dirs * t[:, None].clip(max=1e3)
    return t, (points - center) / radius


def _texture(rng: np.random.Generator, uv: np.ndarray) -> np.ndarray:
    """One random procedural pattern over surface coordinates uv (N, 2) metres -> (N,) in [0, 1]."""
    kind = rng.integers(5)
    if kind == 0:  # stripes
        freq, angle = rng.uniform(2, 8), rng.uniform(0, np.pi)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (uv @ np.array([np.cos(angle), np.sin(angle)])))
    elif kind == 1:  # tiles / checker
        size = rng.uniform(0.15, 0.6)
        base = ((np.floor(uv[:, 0] / size) + np.floor(uv[:, 1] / size)) % 2).astype(np.float64)
    elif kind == 2:  # wood-like grain
        base = 0.5 + 0.5 * np.sin(30 * uv[:, 0] + 3 * np.sin(4 * uv[:, 1]))
    else:  # smooth noise: a few random sinusoids
        base = np.zeros(len(uv))
        for _ in range(4):
            direction = rng.normal(size=2)
            base += np.sin(uv @ direction * rng.uniform(1, 6) + rng.uniform(0, 2 * np.pi))
        base = 0.5 + base / 8
    return np.clip(base, 0, 1)


def _surface_uv(points: np.ndarray, normal: np.ndarray) -> np.ndarray:
    axis = np.abs(normal).argmax(1)
    uv = np.where(axis[:, None] == 0, points[:, [2, 1]], np.where(axis[:, None] == 1, points[:, [0, 2]], points[:, [0, 1]]))
    return uv


def nyu_camera(width: int) -> tuple[float, float, float, float]:
    """NYU's intrinsics (fx, fy, cx, cy) scaled to an image `width` pixels wide."""
    return tuple(v * width / 640 for v in NYU_INTRINSICS)


def render_frame(seed: int, height: int = 480, width: int = 640,
                 intrinsics: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One random room seen by a pinhole camera (`intrinsics` fx, fy, cx, cy in pixels; None: NYU's
    scaled to `width`). The room, furniture and camera pose depend only on `seed`, so two cameras
    see the same room. Returns rgb (H, W, 3) uint8 and z-depth (H, W) float32 metres (no holes)."""
    rng = np.random.default_rng(seed)
    fx, fy, cx, cy = intrinsics if intrinsics is not None else nyu_camera(width)
    room = np.array([rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.0), rng.uniform(3.5, 7.5)])
    camera = np.array([rng.uniform(0.35, 0.65) * room[0], rng.uniform(1.0, 1.6), rng.uniform(0.2, 0.8)])
    rotation = _rotation(rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.1), rng.uniform(-0.05, 0.05))

    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    # Camera frame: x right, y up, z forward with unit z, so the ray parameter t is the z-depth.
    rays_cam = np.stack([(u - cx) / fx, -(v - cy) / fy, np.ones_like(u)], -1).reshape(-1, 3)
    dirs = rays_cam @ rotation.T
    hit = _intersect_room(camera, dirs, room)

    n_surfaces = 6
    for _ in range(rng.integers(3, 9)):  # furniture boxes on the floor
        size = np.array([rng.uniform(0.3, 1.6), rng.uniform(0.3, 1.8), rng.uniform(0.3, 1.2)])
        lo = np.array([rng.uniform(0, room[0] - size[0]), 0.0, rng.uniform(camera[2] + 0.8, room[2] - size[2] + 0.2)])
        t, normal = _intersect_box(camera, dirs, lo, lo + size)
        closer = t < hit.t
        hit.t, hit.normal[closer], hit.surface[closer] = np.where(closer, t, hit.t), normal[closer], n_surfaces
        n_surfaces += 1
    for _ in range(rng.integers(0, 4)):  # spheres (lamps, balls, plants)
        radius = rng.uniform(0.15, 0.5)
        center = np.array(
            [rng.uniform(radius, room[0] - radius), rng.uniform(radius, 2.0), rng.uniform(camera[2] + 1.0, room[2] - radius)]
        )
        t, normal = _intersect_sphere(camera, dirs, center, radius)
        closer = t < hit.t
        hit.t, hit.normal[closer], hit.surface[closer] = np.where(closer, t, hit.t), normal[closer], n_surfaces
        n_surfaces += 1

    points = camera + dirs * hit.t[:, None]
    uv = _surface_uv(points, hit.normal)
    albedo = np.zeros((len(points), 3))
    for surface in range(n_surfaces):
        sel = hit.surface == surface
        if not sel.any():
            continue
        base = rng.uniform(0.15, 0.95, size=3)
        contrast = rng.uniform(0.1, 0.6)
        pattern = _texture(rng, uv[sel])
        albedo[sel] = base * (1 - contrast + contrast * pattern[:, None])
    light = np.array([rng.uniform(0.2, 0.8) * room[0], room[1] - 0.1, rng.uniform(0.3, 0.8) * room[2]])
    to_light = light - points
    distance = np.linalg.norm(to_light, axis=1, keepdims=True)
    lambert = np.clip((hit.normal * to_light / distance).sum(1, keepdims=True), 0, 1)
    shade = (0.3 + 0.9 * lambert / (1 + 0.04 * distance**2)) * rng.uniform(0.8, 1.2)
    rgb = albedo * shade + rng.normal(0, 0.01, size=albedo.shape)
    rgb = (np.clip(rgb, 0, 1) * 255).reshape(height, width, 3).astype(np.uint8)
    return rgb, hit.t.reshape(height, width).astype(np.float32)


def add_kinect_holes(depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zeros where a Kinect loses depth: blobs, and shadow bands along depth discontinuities."""
    height, width = depth.shape
    out = depth.copy()
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 7)):
        r0, c0 = rng.uniform(0, height), rng.uniform(0, width)
        a, b = rng.uniform(0.02, 0.08) * width, rng.uniform(0.02, 0.08) * height
        out[((cols - c0) / a) ** 2 + ((rows - r0) / b) ** 2 < 1] = 0
    edge = np.zeros_like(depth, dtype=bool)
    edge[:, 1:] |= np.abs(np.diff(depth, axis=1)) > 0.15
    edge[1:, :] |= np.abs(np.diff(depth, axis=0)) > 0.15
    shadow = edge.copy()
    for shift in range(1, max(2, width // 160) + 1):  # the IR projector's shadow falls to one side
        shadow[:, shift:] |= edge[:, :-shift]
    out[shadow] = 0
    out[depth > 10.0] = 0
    return out


def frame_seed(seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"spd-synth:{seed}:{split}:{index}".encode())


def _write_frame(args: tuple[Path, str, int, int, int, int, bool, tuple]) -> str:
    split_root, split, index, seed, height, width, holes, intrinsics = args
    seed_i = frame_seed(seed, split, index)
    rgb, depth = render_frame(seed_i, height, width, intrinsics)
    if holes:
        depth = add_kinect_holes(depth, np.random.default_rng(seed_i + 1))
    scene = f"synth_room_{index:05d}"
    (split_root / scene).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(split_root / scene / "rgb_00000.jpg", quality=95)
    write_depth_png(split_root / scene / "sync_depth_00000.png", depth)
    lead = "/" if split == "train" else ""  # BTS: train lines start with '/', test lines do not
    return f"{lead}{scene}/rgb_00000.jpg {lead}{scene}/sync_depth_00000.png {intrinsics[0]:.4f}"


def generate(
    out: str | Path,
    n_train: int,
    n_test: int,
    size: tuple[int, int] = (480, 640),
    holes: bool = False,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    sparse: int = 0,
    intrinsics: tuple[float, float, float, float] | None = None,
) -> Path:
    """Writes a synthetic NYU-layout dataset to `out` and returns `out`. `intrinsics` (fx, fy, cx, cy)
    in pixels of the written size: the camera (None: NYU's scaled to the width); the split lists and
    descriptions record it."""
    from tqdm import tqdm

    out = Path(out)
    height, width = size
    camera = tuple(float(v) for v in intrinsics) if intrinsics is not None else nyu_camera(width)
    jobs = []
    for split, count, sub in (("train", n_train, TRAIN_DIR), ("test", n_test, TEST_DIR)):
        jobs += [(out / sub, split, i, seed, height, width, holes, camera) for i in range(count)]
    if workers == 1:
        lines = [_write_frame(job) for job in tqdm(jobs, desc="spd synth", disable=not progress)]
    else:
        # forkserver: workers forked from a fresh single-threaded process, never from this one, whose
        # threads (PyTorch's, ONNX Runtime's, a test runner's) may hold locks a forked child would wait on forever.
        context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            lines = list(tqdm(pool.map(_write_frame, jobs, chunksize=4), total=len(jobs), desc="spd synth",
                              disable=not progress))
    (out / "train_files.txt").write_text("".join(line + "\n" for line in lines[:n_train]))
    (out / "test_files.txt").write_text("".join(line + "\n" for line in lines[n_train:]))
    write_descriptions(out, lines[:n_train], lines[n_train:], camera, sparse, seed)
    # What wrote this folder: `spd train` records models trained on it as trained on synthetic rooms
    (out / "synth.json").write_text(json.dumps({"generator": "spd synth", "seed": seed, "size_hw": [height, width],
                                                "train": n_train, "test": n_test}))
    # The RGB files alone, relative to OUT: unlabelled images for `spd distill label --images`
    (out / "train_images.txt").write_text("".join(f"{TRAIN_DIR}/{line.split()[0].lstrip('/')}\n" for line in lines[:n_train]))
    return out


def write_descriptions(out: Path, train_lines: list[str], test_lines: list[str], camera: tuple, sparse: int,
                       seed: int) -> None:
    """The same frames as dataset descriptions (`spd.data.described`): `dense.yaml` (the depth PNGs)
    and, with `sparse` > 0, `sparse.yaml`: per frame a `points.csv` of `sparse` labels u, v, depth_m
    at distinct valid pixel centres (fixed seed), read from the frame's exact depth."""
    intrinsics = [round(float(v), 4) for v in camera]
    kinds = {"dense": lambda rgb, depth, split, i: depth}
    if sparse > 0:
        kinds["sparse"] = lambda rgb, depth, split, i: _write_points(out, depth, sparse, frame_seed(seed, split, i) + 2)
    for kind, label_of in kinds.items():
        for split, lines, sub in (("train", train_lines, TRAIN_DIR), ("test", test_lines, TEST_DIR)):
            listed = []
            for i, line in enumerate(lines):
                rgb, depth = (f"{sub}/{part.lstrip('/')}" for part in line.split()[:2])
                listed.append(f"{rgb} {label_of(rgb, depth, split, i)}\n")
            (out / f"{kind}_{split}.txt").write_text("".join(listed))
        description = {"root": ".", "list": f"{kind}_train.txt", "val_list": f"{kind}_test.txt", "depth_scale": 1000.0,
                       "intrinsics": intrinsics}
        (out / f"{kind}.yaml").write_text(yaml.safe_dump(description, sort_keys=False))
    test_description = {"root": ".", "list": "dense_test.txt", "depth_scale": 1000.0, "intrinsics": intrinsics}
    (out / "dense_test.yaml").write_text(yaml.safe_dump(test_description, sort_keys=False))  # for spd eval


def _write_points(out: Path, depth_path: str, count: int, seed: int) -> str:
    depth = np.asarray(Image.open(out / depth_path), dtype=np.float64) / 1000.0
    rows, cols = np.nonzero(depth > 0)
    pick = np.random.default_rng(seed).choice(rows.size, size=min(count, rows.size), replace=False)
    path = Path(depth_path).with_name("points.csv")
    lines = ["u,v,depth_m"] + [f"{cols[i]},{rows[i]},{depth[rows[i], cols[i]]:.4f}" for i in np.sort(pick)]
    (out / path).write_text("\n".join(lines) + "\n")
    return str(path)
