"""What `SPD.encode` computes once per image batch and every `decode` call reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd.models.rows import LevelIndex, RowLayout


@dataclass
class EncodedFeatures:
    """Everything `decode` needs, computed once per image batch by `encode`.

    Shapes (H, W = padded image size); l1, l2, proj_l3, proj_l4 and the value maps in channels-last
    memory (one row per cell):
        l1 (B, d, H/4, W/4), l2 (B, d, H/8, W/8), l3 (B, C3, H/16, W/16), l4 (B, C4, H/32, W/32),
        proj_l3 (B, d, H/16, W/16), proj_l4 (B, d, H/32, W/32),
        msda_values: per MSDA layer its four value maps (`MSDeformableAttention.value_maps`),
        global_kv: per B3b layer (keys, values) each (B, heads, N_L4, d_head).
        image_size: (H, W) of the image as given (before padding), in pixels.
        table, layout: the row table every map above that is d-wide lives in (l1, l2, proj_l3,
            proj_l4 and the MSDA value maps are views into it; see `spd.models.rows`);
        seed_index: `LevelIndex` of l1, l2, proj_l3, proj_l4 in the table; msda_index: per MSDA layer
            the `LevelIndex` of its four value maps (None when a layer samples raw maps).
        query_affine: pixel (u, v) -> normalised grid = u * row0 + row1, -> position in [0, 1] =
            u * row2 + row3 (device constants, so decode builds no tensor on the host).
    """

    l1: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    l4: torch.Tensor
    proj_l3: torch.Tensor
    proj_l4: torch.Tensor
    msda_values: list[list[torch.Tensor]]
    global_kv: list[tuple[torch.Tensor, torch.Tensor]]
    image_size: tuple[int, int]
    table: torch.Tensor | None  # None: encoded for the reference paths (training), which need no table
    layout: RowLayout | None
    seed_index: LevelIndex | None
    msda_index: list[LevelIndex] | None
    query_affine: torch.Tensor  # (4, 2): rows grid scale, grid shift, position scale, position shift (x, y)
    seed_extent: torch.Tensor | None  # (4, 1, 2) float: (w, h) of L1, L2, L3, L4 in cells
    l1_index: LevelIndex | None  # L1 alone (LDRM's receptive-field reads)

    @property
    def batch_size(self) -> int:
        return self.l1.shape[0]

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.l1.shape[-2] * 4, self.l1.shape[-1] * 4

    @property
    def canvas_rows(self) -> tuple[int, int]:
        """Table rows [start, stop) of L2, proj_L3, proj_L4: what every decode call's canvas starts from."""
        start = self.layout.offsets[1]
        return start, self.layout.offsets[3] + self.layout.rows(3)
