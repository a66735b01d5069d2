"""NYU Depth V2 data: BTS layout and labeled .mat, augmentation, queries, synthetic scenes."""

from spd.data.io import NYU_FOCAL, NYU_INTRINSICS, DataError, read_depth_png, read_rgb
from spd.data.nyu import (
    NYU_TEST_LIST, NYU_TRAIN_LIST, NYUDepth, NYULabeled, official_labeled_indices, read_filelist, resolve_split_list,
)
from spd.data.queries import collate, sample_eval_queries, sample_uniform_queries

__all__ = [
    "NYU_FOCAL", "NYU_INTRINSICS", "DataError", "read_depth_png", "read_rgb", "NYUDepth", "NYULabeled",
    "official_labeled_indices", "read_filelist", "collate", "sample_eval_queries", "sample_uniform_queries",
    "NYU_TRAIN_LIST", "NYU_TEST_LIST", "resolve_split_list",
]
