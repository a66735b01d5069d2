"""NYU data pipeline, augmentation alignment, queries, synthetic generator, data check (issue 3)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spd.data import DataError, NYUDepth, NYULabeled, collate, read_depth_png
from spd.data.check import check_dataset
from spd.data.queries import (
    crop_mask,
    downsample_valid_mean,
    sample_eval_queries,
    sample_uniform_queries,
)
from spd.data.synthetic import generate
from spd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spd.geometry.windows import gather_windows

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"


def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_real_fixtures_depth_is_png_millimetres_over_1000(tmp_path):
    names = ["00000", "00050", "00100"]
    filelist = _write_list(tmp_path / "list.txt", [f"/rgb_{n}.jpg /sync_depth_{n}.png 518.8579" for n in names])
    dataset = NYUDepth(FIXTURES / "sync", filelist, split="test")
    for n, sample in zip(names, dataset):
        raw = np.asarray(Image.open(FIXTURES / "sync" / f"sync_depth_{n}.png"))
        assert raw.dtype == np.uint16
        expected = torch.from_numpy(raw.astype(np.float32) / 1000.0)
        assert torch.equal(sample["depth"][0], expected)
        assert torch.equal(sample["valid"][0], torch.from_numpy(raw > 0))  # holes (0) are invalid
        assert (raw == 0).mean() > 0.2  # these fixtures really have holes
        assert sample["image"].shape == (3, 480, 640)
        assert sample["focal"] == pytest.approx(518.8579)
        rgb = np.asarray(Image.open(FIXTURES / "sync" / f"rgb_{n}.jpg"), dtype=np.float32) / 255.0
        torch.testing.assert_close(_unnormalise(sample["image"]), torch.from_numpy(rgb).permute(2, 0, 1))


def test_official_test_fixture_reads(tmp_path):
    filelist = _write_list(tmp_path / "list.txt", ["rgb.png depth.png 518.8579"])
    sample = NYUDepth(FIXTURES / "official_test", filelist, split="test", num_queries=256)[0]
    assert sample["queries"].shape == (256, 2)
    assert sample["query_mask"].all()
    inside = crop_mask(480, 640, "eigen")
    u, v = sample["queries"].long().unbind(-1)
    assert inside[v, u].all()
    assert sample["valid"][0, v, u].all()


def _block_frame(tmp_path: Path, size=(480, 640)) -> Path:
    """A frame whose depth is a known function of the red channel, constant over 16x16 blocks."""
    rng = np.random.default_rng(0)
    height, width = size
    red = rng.integers(0, 256, size=(height // 16, width // 16)).repeat(16, 0).repeat(16, 1).astype(np.uint8)
    rgb = np.stack([red, rng.integers(0, 256, red.shape, dtype=np.uint8), np.full_like(red, 128)], -1)
    depth_mm = (1000 + red.astype(np.uint16) * 30).astype(np.uint16)  # 1.0 .. 8.65 m
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(depth_mm).save(tmp_path / "depth.png")
    return _write_list(tmp_path / "list.txt", ["rgb.png depth.png 518.8579"])


def _red_to_depth(image: torch.Tensor) -> torch.Tensor:
    return 1.0 + torch.round(_unnormalise(image)[0] * 255.0) * 0.030


def test_augmentation_without_rotation_keeps_exact_alignment(tmp_path):
    filelist = _block_frame(tmp_path)
    dataset = NYUDepth(tmp_path, filelist, split="train", rotation_deg=0.0, color_p=0.0, num_queries=64)
    flips = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        assert sample["image"].shape == (3, 416, 544)
        assert sample["depth"].shape == (1, 416, 544)
        torch.testing.assert_close(_red_to_depth(sample["image"]), sample["depth"][0], atol=1e-4, rtol=0)
        flips.add(float(sample["depth"][0, 0, 0]))
    assert len(flips) > 1  # crops/flips really change between epochs


@pytest.mark.parametrize("box", [None, "nyu"], ids=["crop-then-rotate", "nyu-box-rotate-then-crop"])
def test_augmentation_with_rotation_keeps_alignment(tmp_path, box):
    from spd.data.transforms import NYU_BTS_BOX

    filelist = _block_frame(tmp_path)
    dataset = NYUDepth(tmp_path, filelist, split="train", rotation_deg=2.5, color_p=0.0,
                       valid_box=NYU_BTS_BOX if box else None)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        valid = sample["valid"][0]
        error = (_red_to_depth(sample["image"]) - sample["depth"][0]).abs()[valid]
        # Bilinear image vs nearest depth agree except on the 1-px seams between blocks.
        assert (error < 1e-3).float().mean() > 0.85
        if box is None:  # rotating the crop brings in black corners (BTS's order mostly crops them away)
            assert not valid[0, 0] or not valid[0, -1] or not valid[-1, 0]


def test_same_epoch_and_index_give_the_same_sample(tmp_path):
    filelist = _block_frame(tmp_path)
    dataset = NYUDepth(tmp_path, filelist, split="train", num_queries=32)
    a, b = dataset[0], dataset[0]
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["queries"], b["queries"])


def test_uniform_queries_pad_when_few_valid():
    valid = torch.zeros(10, 12, dtype=torch.bool)
    valid[2, 3] = valid[7, 11] = valid[9, 0] = True
    queries, mask = sample_uniform_queries(valid, 5, torch.Generator().manual_seed(0))
    assert mask.tolist() == [True, True, True, False, False]
    assert {tuple(q) for q in queries[:3].long().tolist()} == {(3, 2), (11, 7), (0, 9)}


def test_eval_queries_are_fixed_for_a_seed():
    valid = torch.ones(480, 640, dtype=torch.bool)
    first, _ = sample_eval_queries(valid, 4, seed=0, sample_id="bathroom/rgb_00045")
    again, _ = sample_eval_queries(valid, 4, seed=0, sample_id="bathroom/rgb_00045")
    other, _ = sample_eval_queries(valid, 4, seed=1, sample_id="bathroom/rgb_00045")
    # numpy's PCG64 stream is platform-independent: these exact points on every machine.
    assert first.tolist() == [[110.0, 247.0], [162.0, 466.0], [277.0, 182.0], [514.0, 428.0]]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_patch_gt_crops_align_with_the_model_patch(tiny_model):
    depth = torch.arange(48 * 64, dtype=torch.float32).view(1, 1, 48, 64)
    queries = torch.tensor([[[10.0, 20.0], [33.0, 5.0], [63.0, 47.0]]])
    origin = tiny_model.ldrm_patch_origin(queries)
    crops = gather_windows(depth, origin, 28)[:, :, 0]  # (1, K, 28, 28)
    for k in range(3):
        x0, y0 = origin[0, k].tolist()
        for j, i in [(0, 0), (13, 14), (27, 27), (5, 20)]:
            x, y = x0 + i, y0 + j
            expected = depth[0, 0, y, x] if 0 <= x < 64 and 0 <= y < 48 else 0.0
            assert crops[0, k, j, i] == expected
        # The query's own pixel sits at (u - x0, v - y0) inside its crop.
        u, v = queries[0, k].long().tolist()
        assert crops[0, k, v - y0, u - x0] == depth[0, 0, v, u]


def test_canvas_gt_never_averages_holes():
    depth = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]).view(1, 1, 2, 4)
    valid = depth > 0
    gt, gt_valid = downsample_valid_mean(depth, valid, stride=2)
    assert gt.tolist() == [[[[3.0, 0.0]]]]
    assert gt_valid.tolist() == [[[[True, False]]]]


def test_collate_pads_variable_k():
    def sample(k):
        return {"image": torch.zeros(3, 4, 4), "depth": torch.ones(1, 4, 4), "valid": torch.ones(1, 4, 4, dtype=torch.bool),
                "focal": 1.0, "id": str(k), "queries": torch.ones(k, 2), "query_mask": torch.ones(k, dtype=torch.bool)}
    batch = collate([sample(3), sample(5)])
    assert batch["queries"].shape == (2, 5, 2)
    assert batch["query_mask"].sum(1).tolist() == [3, 5]


def test_synth_output_loads_and_checks(tmp_path):
    out = generate(tmp_path / "syn", n_train=3, n_test=2, size=(96, 128), holes=True, seed=7, workers=1, progress=False)
    train = NYUDepth(out / "sync", out / "train_files.txt", split="train", crop_size=(64, 96), num_queries=16)
    test = NYUDepth(out / "official_splits/test", out / "test_files.txt", split="test", eval_crop="none", num_queries=16)
    assert len(train) == 3
    assert len(test) == 2
    assert train[0]["image"].shape == (3, 64, 96)
    assert test[1]["depth"].shape == (1, 96, 128)
    assert check_dataset(out / "sync", out / "train_files.txt", progress=False).ok
    assert check_dataset(out / "official_splits/test", out / "test_files.txt", progress=False).ok
    # Deterministic per seed.
    again = generate(tmp_path / "again", n_train=3, n_test=0, size=(96, 128), holes=True, seed=7, workers=1, progress=False)
    a = read_depth_png(out / "sync/synth_room_00002/sync_depth_00000.png")
    b = read_depth_png(again / "sync/synth_room_00002/sync_depth_00000.png")
    assert np.array_equal(a, b)
    assert (a == 0).any()
    assert a.max() > 0.5


def test_bad_files_are_named_and_all_reported(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        shutil.copy(FIXTURES / "sync/rgb_00000.jpg", root / f"{name}.jpg")
        shutil.copy(FIXTURES / "sync/sync_depth_00000.png", root / f"{name}.png")
    (root / "b.png").unlink()  # missing
    data = (root / "c.png").read_bytes()
    (root / "c.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.fromarray(np.zeros((240, 320), np.uint16)).save(root / "d.png")  # wrong size
    Image.fromarray(np.zeros((480, 640), np.uint8)).save(root / "e.png")  # wrong dtype (8-bit)
    filelist = _write_list(tmp_path / "list.txt", [f"{n}.jpg {n}.png 518.8579" for n in "abcde"])

    report = check_dataset(root, filelist, progress=False)
    text = "\n".join(report.errors)
    assert len(report.errors) == 4, text
    assert "b.png: file not found" in text
    assert "c.png: unreadable or truncated" in text
    assert "d.png: depth is 320x240 but its RGB" in text
    assert "e.png: depth must be a 16-bit PNG" in text

    dataset = NYUDepth(root, filelist, split="test")
    for index, message in [(1, "b.png: file not found"), (2, "c.png: unreadable"), (3, "d.png: depth is 320x240"),
                           (4, "e.png: depth must be a 16-bit")]:
        with pytest.raises(DataError, match=message):
            dataset[index]


def test_malformed_split_list(tmp_path):
    filelist = _write_list(tmp_path / "list.txt", ["a.jpg a.png 518.8", "only_one_token"])
    with pytest.raises(DataError, match="line 2"):
        NYUDepth(tmp_path, filelist)


def test_labeled_mat_official_split(tmp_path):
    h5py = pytest.importorskip("h5py")
    frames = 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(frames, 3, 64, 48), dtype=np.uint8)  # MATLAB order (N, 3, W, H)
    depths = rng.uniform(0.5, 9.0, size=(frames, 64, 48)).astype(np.float32)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:
        f["images"], f["depths"] = images, depths
    dataset = NYULabeled(path, split="test", num_queries=8, eval_crop="none")
    # Official test indices (1-based) start 1, 2, 9, 14, 15, 16: six of them below 16 frames.
    assert len(dataset) == 6
    assert dataset.indices == [0, 1, 8, 13, 14, 15]
    sample = dataset[2]
    assert sample["id"] == "labeled_00008"
    assert torch.equal(sample["depth"][0], torch.from_numpy(depths[8].T.copy()))
    torch.testing.assert_close(_unnormalise(sample["image"]), torch.from_numpy(images[8].transpose(0, 2, 1) / 255.0).float())


def _locate(window: np.ndarray, frame: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of `window` inside `frame` (exact match, or its mirror image)."""
    height, width = window.shape
    for flipped in (False, True):
        target = window[:, ::-1] if flipped else window
        strip = target[height // 2, :32]
        for top in range(frame.shape[0] - height + 1):
            row = frame[top + height // 2]
            for left in range(frame.shape[1] - width + 1):
                if not np.array_equal(row[left : left + 32], strip):
                    continue
                if np.array_equal(frame[top : top + height, left : left + width], target):
                    return top, left, flipped
    raise AssertionError("the crop is not a window of the frame")


def test_nyu_training_crops_lie_inside_the_bts_box_with_most_of_its_valid_depth(tmp_path):
    """BTS's NYU recipe on the real sync frames: every 416x544 crop (rotation off, to find it) lies
    inside the box (43, 45, 608, 472), and holds >= 90 % of the box's valid-depth share."""
    from spd.data.transforms import NYU_BTS_BOX

    names = [("rgb_00000.jpg", "sync_depth_00000.png"), ("rgb_00050.jpg", "sync_depth_00050.png"),
             ("rgb_00100.jpg", "sync_depth_00100.png")]
    (tmp_path / "list.txt").write_text("".join(f"{rgb} {depth} 518.8579\n" for rgb, depth in names))
    dataset = NYUDepth(FIXTURES / "sync", tmp_path / "list.txt", split="train", rotation_deg=0, color_p=0)
    left, upper, right, lower = NYU_BTS_BOX
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index, (_, depth_name) in enumerate(names):
            frame = read_depth_png(FIXTURES / "sync" / depth_name)
            crop = dataset[index]["depth"][0].numpy()
            top, start, _ = _locate(crop, frame)
            assert upper <= top and top + 416 <= lower and left <= start and start + 544 <= right
            box_share = (frame[upper:lower, left:right] > 1e-3).mean()
            assert (crop > 1e-3).mean() >= 0.9 * box_share


def test_nyu_recipe_rotates_before_the_random_crop():
    """BTS's order: box -> rotation -> random crop; the generic order (other sizes) crops first."""
    from torchvision.transforms import v2

    from spd.data.transforms import train_transform

    kinds = lambda t: [type(step) for step in t.transforms][:2]  # noqa: E731
    assert kinds(train_transform(rotate_first=True)) == [v2.RandomRotation, v2.RandomCrop]
    assert kinds(train_transform()) == [v2.RandomCrop, v2.RandomRotation]
