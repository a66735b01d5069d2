"""NYU Depth V2 data: BTS layout and labeled .mat, augmentation, queries, synthetic scenes."""

from importlib import resources

from spd.data.io import NYU_FOCAL, NYU_INTRINSICS, DataError, read_depth_png, read_rgb
from spd.data.nyu import NYUDepth, NYULabeled, official_labeled_indices, read_filelist
from spd.data.queries import collate, sample_eval_queries, sample_uniform_queries

SPLITS = resources.files("spd.data.splits")
NYU_TRAIN_LIST = SPLITS / "nyudepthv2_train_files_with_gt.txt"  # relative to <nyu>/sync
NYU_TEST_LIST = SPLITS / "nyudepthv2_test_files_with_gt.txt"  # relative to <nyu>/official_splits/test

__all__ = [
    "NYU_FOCAL", "NYU_INTRINSICS", "DataError", "read_depth_png", "read_rgb", "NYUDepth", "NYULabeled",
    "official_labeled_indices", "read_filelist", "collate", "sample_eval_queries", "sample_uniform_queries",
    "NYU_TRAIN_LIST", "NYU_TEST_LIST",
]
