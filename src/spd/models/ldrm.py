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
from torch.utils.checkpoint import checkpoint

from spd.config.model import check_ldrm_patch
from spd.geometry.windows import gather_windows
from spd.models.onednn import linear
from spd.models.precision import low_precision_buffers
from spd.models.rows import LevelIndex, exporting_ops

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
        # The fast path's constants (see `_fast_local_feat`): both x2 upsamplings as matrices on
        # windows (the first from 5 x 5 L1 cells, the second from 4 x 4 feat_14 values), the 5 x 5
        # cell offsets (x, y) of the first window, and (1, 2) to code a per-axis choice as 2y + x.
        self.register_buffer("windows_14", _windows_14(), persistent=False)
        self.register_buffer("windows_28", _windows_28(), persistent=False)
        steps = torch.arange(5.0)
        self.register_buffer("window_cells", torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1), persistent=False)
        self.register_buffer("axis_code", torch.tensor([1.0, 2.0]), persistent=False)
        # The centre 4x4 of the 6x6 up_14 window, as positions of its 36 (row-major): exported graphs
        # take it with one Gather (ONNX Runtime's two strided Slices cost ~4x more at K = 4096).
        self.register_buffer("centre_cells", torch.tensor([6 * y + x for y in range(1, 5) for x in range(1, 5)]),
                             persistent=False)
        # The two upsampling matrices meet the row table's values in matmuls: a bf16 predictor stores
        # them in bf16 once (exact: every entry is a multiple of 1/16).
        low_precision_buffers(self, "windows_14", "windows_28")
        self.patch = patch
        self.checkpointing = False  # training: recompute full_patch in backward instead of keeping its activations
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
        self,
        l1: torch.Tensor,
        queries: torch.Tensor,
        return_patch: bool = False,
        rows: tuple[torch.Tensor, LevelIndex] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`rows` = (row table, L1's LevelIndex in it) selects the receptive-field fast path
        (inference; not with `return_patch`, which needs the whole feat_28)."""
        batch, num_queries, _ = queries.shape
        if not return_patch and rows is not None:
            # The same origin in float (small integers, exact): the fast path converts to indices once.
            origin = torch.floor(queries / L1_STRIDE) - self.patch // 2
            offset_px = queries - origin * L1_STRIDE  # (B, K, 2), in [4c, 4c+4)
            return self._fast_local_feat(*rows, origin, offset_px).view(batch, num_queries, -1), None
        origin = self.patch_origin(queries)
        offset_px = queries - (origin * L1_STRIDE).to(queries.dtype)  # (B, K, 2), in [4c, 4c+4)
        patches = self.gather_patch_cells(l1, origin, self.patch)
        if self.checkpointing and torch.is_grad_enabled():  # exact: the same ops again in backward
            feat = checkpoint(self.full_patch, patches, use_reentrant=False)
        else:
            feat = self.full_patch(patches)  # (B*K, D, 4P, 4P)
        local = self._sample(feat, offset_px)
        feat_patch = feat.view(batch, num_queries, *feat.shape[1:]) if return_patch else None
        return local.view(batch, num_queries, -1), feat_patch

    def _fast_local_feat(
        self, table: torch.Tensor, l1_index: LevelIndex, origin: torch.Tensor, offset_px: torch.Tensor
    ) -> torch.Tensor:
        """Exact `local_feat` from its receptive field only (~3 M instead of ~58 M MACs per query at v15).

        Index bookkeeping, per axis, with c = P//2 and the query at x = 4c + f + a (f in {0..3}, a in [0, 1)):
        bilinear sampling needs feat_28[4c+f : 4c+f+2]; its 3x3 conv needs up_28[4c+f-1 : 4c+f+3]; those
        come from four feat_14 values starting at 2c-1+s (s = f >= 2); the 3x3 conv there needs
        up_14[2c-2+s : 2c+4+s], interpolated from the five cells [c-2, c+2]. Within these windows every
        bilinear source coordinate is interior (no edge clamping), so window maths equals patch maths.

        L1 is read from the row table (`l1_index`: its `LevelIndex`, one level); the second x2
        upsampling is one batched matmul with the constant matrices `windows_28` picked by the
        window's start. origin: (B, K, 2) float cells (whole numbers). Shape: (B, K, ...) -> (B*K, D).
        """
        n = origin.shape[0] * origin.shape[1]
        position = offset_px - 4 * (self.patch // 2)  # (B, K, 2) in [0, 4): position inside the central cell
        f = position.floor().clamp(0, 3)
        s = f >= 2
        # up_14[2c-2+s+t] (t = 0..5) is bilinear x2 upsampling of the cells: a bilinear sample of L1
        # at cell coordinate origin + c - 2 + 0.75 + (s + t) / 2 (zeros outside the map, as the
        # patch gather), which reads only the 5 x 5 cells from origin + c - 2: one gather of those
        # rows of the row table (off-map cells zeroed) and one matmul with the matrix for s.
        cells = (origin + (self.patch // 2 - 2)).view(*origin.shape[:2], 1, 1, 2) + self.window_cells  # (B, K, 5, 5, 2)
        on_map = cells.clamp(min=0).minimum(l1_index.max_xy.view(1, 1, 1, 1, 2))
        inside = (on_map == cells).all(-1).view(n, 1, 25)  # off-map cells get weight 0 (zeros outside)
        # Three index sets, computed in float (small integers, exact) and made indices by one conversion
        # (each conversion is a kernel launch on a GPU): the 25 cells' rows within L1, the first
        # upsampling's matrix 2 s_y + s_x, and the second one's window start f + 1 - 2s per axis, coded as 2y + x.
        cell_rows = (on_map * l1_index.stride.view(1, 1, 1, 1, 2)).sum(-1).view(-1)  # (N*25,)
        choice = (s * self.axis_code).sum(-1).view(-1)  # (N,)
        start = ((f - 2 * s) * self.axis_code).sum(-1).view(-1)  # (N,) in {1, 2}
        cell_rows, choice, start = torch.cat([cell_rows, choice, start]).long().split([25 * n, n, n])
        rows = l1_index.base.view(-1, 1, 1) + cell_rows.view(*origin.shape[:2], 25)  # rows of the table
        matrix = self.windows_14.index_select(0, choice) * inside  # (N, 36, 25), stored like the table (see __init__)
        # index_select, not table[rows]: the same rows, several times faster on CPU (advanced
        # indexing takes a general strided-gather kernel).
        window = table.index_select(0, rows.view(-1)).view(n, 25, -1)  # (N, 25, C) L1 cells, channels last
        up_14 = torch.bmm(matrix, window).view(n, 6, 6, -1)  # up_14[2c-2+s : 2c+4+s]
        feat_14 = F.gelu(F.conv2d(up_14.permute(0, 3, 1, 2), self.conv_mid.weight, self.conv_mid.bias))  # 6 -> 4
        # The 1x1 residual as one (16N, C) matmul: a strided 4-D input would make F.linear broadcast
        # its weight into a batched matmul (a (4N, C, mid) copy of the weight under bf16 autocast).
        if exporting_ops():
            centre = up_14.view(n, 36, -1).index_select(1, self.centre_cells).view(n * 16, -1)
        else:
            centre = up_14[:, 1:-1, 1:-1].reshape(n * 16, -1)
        residual = linear(centre, self.conv_residual.weight.flatten(1), self.conv_residual.bias).view(n, 4, 4, -1)
        feat_14 = feat_14.permute(0, 2, 3, 1) + residual  # (N, 4, 4, mid): feat_14[2c-1+s : 2c+3+s]
        windows_28 = self.windows_28.index_select(0, start)
        up_28 = torch.bmm(windows_28, feat_14.reshape(n, 16, -1))  # up_28[4c+f-1 : 4c+f+3]
        feat_28 = F.gelu(F.conv2d(up_28.view(n, 4, 4, -1).permute(0, 3, 1, 2), self.conv_out.weight, self.conv_out.bias))
        frac = (position - f).view(n, 2)  # (N, 2) in [0, 1): bilinear weights inside feat_28's 2x2 window
        weight_x, weight_y = torch.stack([1.0 - frac, frac], -1).unbind(1)  # (N, 2) each
        weight = (weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)).unsqueeze(1)  # (N, 1, 2, 2)
        return (feat_28 * weight).sum((-2, -1))

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


def _windows_14() -> torch.Tensor:
    """The fast path's first x2 upsampling: the 6 up_14 values of a window from the 5 L1 cells
    [c-2, c+2] per axis, at cell offsets 0.75 + (s + t) / 2 (t = 0..5) for window start s in {0, 1}
    -> (4, 36, 25), entry 2 s_y + s_x. Constant: a buffer of the module."""
    per_axis = torch.zeros(2, 6, 5)
    for start in (0, 1):
        for t in range(6):
            position = 0.75 + (start + t) / 2
            low = int(position)
            per_axis[start, t, low] += 1 - (position - low)
            per_axis[start, t, low + 1] += position - low
    return _window_pairs(per_axis)


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
