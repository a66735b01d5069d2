"""LDRM: local DPT-style refinement per query (DESIGN.md §3, §6).

The patch is the P x P block of L1 cells (stride 4) centred on the cell that contains the query:
`c0 = floor(u/4) - P//2`, `r0 = floor(v/4) - P//2`, gathered without interpolation, zeros outside
the map. Two bilinear x2 upsamplings with convolutions give `feat_28` (4P x 4P, stride 1), and with
align_corners=False `feat_28[:, j, i]` lies exactly on image pixel `(4*c0 + i, 4*r0 + j)`.
`local_feat` is `feat_28` sampled at `(u - 4*c0, v - 4*r0)`, which always falls in the patch's
central cell: the plan's "(u mod 4) + 12" offset, made exact.

Two paths compute the same `local_feat`:
- `full` (reference; training, because the dense head needs the whole `feat_28`);
- `fast` (inference): only the receptive field of the sample point, with 'valid' convolutions on
  per-query windows; ~17x fewer MACs and exact (see `_fast_local_feat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spd.config import check_ldrm_patch
from spd.geometry.coords import bilinear_corners_at_cells
from spd.geometry.windows import gather_windows
from spd.models.splat import channels_last_rows, weighted_gather

L1_STRIDE = 4


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class LocalRefinement(nn.Module):
    """Shape:
        forward: l1 (B, C, H/4, W/4), queries (B, K, 2) pixels ->
        local_feat (B, K, out_dim) and, when `return_patch`, feat_28 (B, K, out_dim, 4P, 4P).
    """

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int, patch: int = 7) -> None:
        super().__init__()
        check_ldrm_patch(patch)
        # The fast path's constant x2 upsampling matrices of a 4x4 window (see `_fast_local_feat`).
        self.register_buffer("windows_28", _windows_28(), persistent=False)
        self.patch = patch
        self.conv_mid = nn.Conv2d(in_dim, mid_dim, kernel_size=3, padding=1)
        self.conv_residual = nn.Conv2d(in_dim, mid_dim, kernel_size=1)
        self.conv_out = nn.Conv2d(mid_dim, out_dim, kernel_size=3, padding=1)

    def patch_origin(self, queries: torch.Tensor) -> torch.Tensor:
        """(c0, r0) of each query's patch in L1 cells. Shape: (B, K, 2) pixels -> (B, K, 2) long."""
        return torch.floor(queries / L1_STRIDE).long() - self.patch // 2

    def gather_patch_cells(self, l1: torch.Tensor, origin: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
        """`size` x `size` L1 cells starting at origin + offset, zeros outside the map.

        Shape: l1 (B, C, h, w), origin (B, K, 2) -> (B*K, C, size, size).
        """
        return gather_windows(l1, origin + offset, size).flatten(0, 1)

    def full_patch(self, patches: torch.Tensor) -> torch.Tensor:
        """(B*K, C, P, P) -> feat_28 (B*K, out_dim, 4P, 4P), the plan's DPT-style upsampling."""
        up = _upsample2(patches)
        feat_14 = F.gelu(self.conv_mid(up)) + self.conv_residual(up)
        return F.gelu(self.conv_out(_upsample2(feat_14)))

    def forward(
        self, l1: torch.Tensor, queries: torch.Tensor, return_patch: bool = False, fast: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_queries, _ = queries.shape
        origin = self.patch_origin(queries)
        offset_px = queries - (origin * L1_STRIDE).to(queries.dtype)  # (B, K, 2), in [4c, 4c+4)
        if return_patch or not fast:
            patches = self.gather_patch_cells(l1, origin, self.patch)
            feat = self.full_patch(patches)  # (B*K, D, 4P, 4P)
            local = self._sample(feat, offset_px)
            feat_patch = feat.view(batch, num_queries, *feat.shape[1:]) if return_patch else None
            return local.view(batch, num_queries, -1), feat_patch
        return self._fast_local_feat(l1, origin, offset_px).view(batch, num_queries, -1), None

    def _fast_local_feat(self, l1: torch.Tensor, origin: torch.Tensor, offset_px: torch.Tensor) -> torch.Tensor:
        """Exact `local_feat` from its receptive field only (~3 M instead of ~58 M MACs per query at v15).

        Index bookkeeping, per axis, with c = P//2 and the query at x = 4c + f + a (f in {0..3}, a in [0, 1)):
        bilinear sampling needs feat_28[4c+f : 4c+f+2]; its 3x3 conv needs up_28[4c+f-1 : 4c+f+3]; those
        come from four feat_14 values starting at 2c-1+s (s = f >= 2); the 3x3 conv there needs
        up_14[2c-2+s : 2c+4+s], interpolated from cells [c-2, c+2]. Within these windows every
        bilinear source coordinate is interior (no edge clamping), so window maths equals patch maths.

        Layout: windows are channels-last, (N, y, x, C): up_14 is gathered straight from L1's rows
        (a weighted `embedding_bag`) and the second x2 upsampling is one batched matmul with the
        (2D) bilinear matrix picked by the window's start.
        """
        center = self.patch // 2
        position = offset_px - 4 * center  # (B, K, 2) in [0, 4): position inside the central cell
        f = position.floor().clamp(0, 3).long().reshape(-1, 2)  # (N, 2) x, y
        s = (f >= 2).long()
        # up_14[2c-2+s+t] (t = 0..5) is bilinear x2 upsampling of the cells: a bilinear sample of L1
        # at cell coordinate origin + c - 2 + 0.75 + (s + t) / 2 (zeros outside the map, as the
        # patch gather), so the 6x6 window is read straight from L1's channels-last rows.
        steps = torch.arange(6, device=l1.device, dtype=offset_px.dtype) / 2
        start = (origin + (center - 2)).reshape(-1, 2).to(offset_px.dtype) + 0.75 + s.to(offset_px.dtype) / 2
        cell_y = (start[:, 1, None] + steps)[:, :, None].expand(-1, 6, 6)  # (N, 6, 6)
        cell_x = (start[:, 0, None] + steps)[:, None, :].expand(-1, 6, 6)
        batch, channels, height, width = l1.shape
        corner, corner_weight = bilinear_corners_at_cells(cell_x, cell_y, (height, width))  # (N, 6, 6, 4)
        image_of_query = torch.arange(batch, device=l1.device).repeat_interleave(origin.shape[1])
        rows = corner + (image_of_query * (height * width)).view(-1, 1, 1, 1)
        grid_14 = weighted_gather(channels_last_rows(l1), rows, corner_weight)  # (N, 6, 6, C)
        n = grid_14.shape[0]
        feat_14 = F.gelu(F.conv2d(grid_14.permute(0, 3, 1, 2), self.conv_mid.weight, self.conv_mid.bias))  # 6 -> 4
        residual = F.linear(grid_14[:, 1:-1, 1:-1], self.conv_residual.weight.flatten(1), self.conv_residual.bias)
        feat_14 = feat_14.permute(0, 2, 3, 1) + residual  # (N, 4, 4, mid): feat_14[2c-1+s : 2c+3+s]
        windows_28 = self.windows_28.to(grid_14.dtype)  # (4, 16, 16): window start f+1-2s in {1, 2}
        start = f - 2 * s
        up_28 = torch.bmm(windows_28[2 * start[:, 1] + start[:, 0]], feat_14.reshape(n, 16, -1))  # up_28[4c+f-1 : 4c+f+3]
        up_28 = up_28.view(n, 4, 4, -1).permute(0, 3, 1, 2)
        feat_28 = F.gelu(F.conv2d(up_28, self.conv_out.weight, self.conv_out.bias))  # (N, D, 2, 2)
        frac = position.reshape(-1, 2) - f.to(position.dtype)  # (N, 2) in [0, 1)
        ax, ay = frac[:, 0, None], frac[:, 1, None]
        return ((1 - ay) * ((1 - ax) * feat_28[..., 0, 0] + ax * feat_28[..., 0, 1])
                + ay * ((1 - ax) * feat_28[..., 1, 0] + ax * feat_28[..., 1, 1]))

    @staticmethod
    def _sample(feat: torch.Tensor, position_px: torch.Tensor) -> torch.Tensor:
        """Bilinear sample of each query's own map at a pixel position (pixel centres at integers).

        Shape: feat (B*K, D, s, s), position_px (B, K, 2) -> (B*K, D).
        """
        size = feat.shape[-1]
        grid = (2.0 * position_px.reshape(-1, 1, 1, 2) + 1.0) / size - 1.0  # (B*K, 1, 1, 2)
        return F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).flatten(1)


def _upsample_matrix(size: int) -> torch.Tensor:
    """(2*size, size) matrix of bilinear x2 upsampling with align_corners=False (as F.interpolate)."""
    matrix = [[0.0] * size for _ in range(2 * size)]
    for out in range(2 * size):
        source = max(0.0, (out + 0.5) / 2 - 0.5)
        low = min(int(source), size - 1)
        high = min(low + 1, size - 1)
        weight = source - low
        matrix[out][low] += 1 - weight
        matrix[out][high] += weight
    return torch.tensor(matrix, dtype=torch.float32)


def _windows_28() -> torch.Tensor:
    """The fast path's second x2 upsampling of a 4x4 feat_14 window, one 2D map per window start:
    rows [1, 5) or [2, 6) of the 8x4 upsampling matrix per axis -> (4, 16, 16). Constant: a buffer of
    the module, built once instead of in every decode call."""
    up_4 = _upsample_matrix(4)  # (8, 4)
    return _window_pairs(torch.stack([up_4[1:5], up_4[2:6]]))


def _window_pairs(windows: torch.Tensor) -> torch.Tensor:
    """2D bilinear maps of a window from 1D ones: (2, n', n) -> (4, n'*n', n*n), entry 2*sy + sx
    maps a row-major (y, x) window with row map `windows[sy]` and column map `windows[sx]`."""
    return torch.stack([torch.kron(windows[sy], windows[sx]) for sy in (0, 1) for sx in (0, 1)])
