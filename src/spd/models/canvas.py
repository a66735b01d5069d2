"""The triple spatial canvas (DESIGN.md §3, the plan's §6.4).

Three dense maps at strides 8/16/32, re-initialised every decode call from L2, proj_L3 and
proj_L4, shared by all decoder layers of that call. Each decoder layer owns one `CanvasSublayer`:
write (soft-mean splat of the queries) -> joint-gate cascade L4 -> L3 -> L2 -> depthwise smoothing
-> gated read at the queries. This is how queries talk to each other: spatially, through cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spd.models.onednn import Linear
from spd.models.rows import QueryRows, add_rows, as_dtype, bag_sum, exported_canvas_write, exporting_ops, product_in
from spd.models.splat import SplatPlan, sample_at


def depthwise3x3(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)


class CanvasSublayer(nn.Module):
    """One canvas write-cascade-smooth-read step.

    Shape:
        forward: h (B, K, d), grid (B, K, 2) normalised, plans (one SplatPlan per level, made once
        per decode call), canvas [L2 (B, d, H/8, W/8), L3 (B, d, H/16, W/16), L4 (B, d, H/32, W/32)]
        -> (read (B, K, d), the updated canvas list). `forward_rows` is the inference path: the
        same maths on one channels-last canvas buffer, in place, with a handful of ops.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.write = Linear(d_model, d_model)
        self.gate_l4_to_l3_fine = depthwise3x3(d_model)
        self.gate_l4_to_l3_coarse = depthwise3x3(d_model)
        self.gate_l3_to_l2_fine = depthwise3x3(d_model)
        self.gate_l3_to_l2_coarse = depthwise3x3(d_model)
        self.smooth = nn.ModuleList(depthwise3x3(d_model) for _ in range(3))
        self.read_gate = Linear(d_model, 3)
        self.read = Linear(3 * d_model, d_model)

    def forward(
        self, h: torch.Tensor, grid: torch.Tensor, plans: list[SplatPlan], canvas: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # 1. Write: soft mean, so empty cells stay unchanged and magnitude does not grow with K.
        written = self.write(h)
        updated = []
        for level, plan in zip(canvas, plans):
            updated.append(level + plan.splat(written) / (plan.weight_sum + 1.0))
        canvas = self.cascade_and_smooth(updated)  # 2 and 3
        # 4. Read: each level scaled by its own query-dependent gate.
        gates = torch.sigmoid(self.read_gate(h))  # (B, K, 3)
        reads = [sample_at(level, grid) * gates[..., i : i + 1] for i, level in enumerate(canvas)]
        return self.read(torch.cat(reads, dim=-1)), canvas

    def cascade_and_smooth(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """New maps: the joint-gate cascade, coarse to fine (the plan's §6.4 code), then one depthwise
        smoothing step per level, which lets neighbouring cells (and so nearby queries) mix.
        [L2, L3, L4] (B, d, h, w) -> the same shapes."""
        l2, l3, l4 = maps
        l4_up = F.interpolate(l4, size=l3.shape[-2:], mode="bilinear", align_corners=False)
        l3 = l3 + torch.sigmoid(self.gate_l4_to_l3_fine(l3) + self.gate_l4_to_l3_coarse(l4_up)) * l4_up
        l3_up = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        l2 = l2 + torch.sigmoid(self.gate_l3_to_l2_fine(l2) + self.gate_l3_to_l2_coarse(l3_up)) * l3_up
        return [level + smooth(level) for level, smooth in zip((l2, l3, l4), self.smooth)]

    def forward_rows(
        self, h: torch.Tensor, plan: QueryRows, canvas: torch.Tensor, maps: list[torch.Tensor]
    ) -> torch.Tensor:
        """`forward` for inference, in place on the call's canvas buffer (R_canvas, d), which `maps`
        (L2, L3, L4 as (B, d, h, w) channels-last) view: the write to all three levels is one
        `index_add_` of pre-normalised soft-mean weights touching only the queries' cells, gates and
        residuals update the maps in place, and the gated read of all three levels is one
        `embedding_bag`. -> read (B, K, d)."""
        batch, num_queries, d_model = h.shape
        written = as_dtype(self.write(h).view(batch, num_queries, 1, 1, d_model), canvas.dtype)
        if plan.canvas_write is not None:  # exported graphs: touched rows or prefix sums (`exported_canvas_write`)
            canvas.copy_(exported_canvas_write(plan.canvas_write, canvas, written.view(num_queries, d_model)))
        else:
            # In the canvas dtype (bf16 under autocast): a mixed-dtype product is several times slower on CPU.
            contributions = (written * plan.soft_beta).view(-1, d_model)  # (B*K*3*4, d)
            add_rows(canvas, plan.canvas_rows, contributions)
        if exporting_ops():
            self._cascade_and_smooth_whole(canvas, maps)
        else:
            self._cascade_and_smooth_in_place(maps)
        gates = torch.sigmoid(self.read_gate(h)).view(batch, num_queries, 3, 1)
        reads = bag_sum(canvas, plan.canvas_rows, product_in(canvas.dtype, plan.beta, gates).view(-1), plan.starts4_canvas)
        return self.read(reads.view(batch, num_queries, 3 * d_model))

    def _cascade_and_smooth_in_place(self, maps: list[torch.Tensor]) -> None:
        """Joint-gate cascade and smoothing on the canvas maps (views of the buffer), in place."""
        l2, l3, l4 = maps
        l4_up = F.interpolate(l4, size=l3.shape[-2:], mode="bilinear", align_corners=False)
        gate = self.gate_l4_to_l3_fine(l3).add_(self.gate_l4_to_l3_coarse(l4_up)).sigmoid_()
        l3.addcmul_(gate, l4_up)
        l3_up = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        gate = self.gate_l3_to_l2_fine(l2).add_(self.gate_l3_to_l2_coarse(l3_up)).sigmoid_()
        l2.addcmul_(gate, l3_up)
        for level, smooth in zip(maps, self.smooth):
            level.add_(smooth(level))  # the conv reads all of `level` before add_ writes it

    def _cascade_and_smooth_whole(self, canvas: torch.Tensor, maps: list[torch.Tensor]) -> None:
        """The same maths for exported graphs: new maps, then one write of the whole buffer (its rows
        are L2, L3, L4 in order, each (B, h, w, d) row-major, as `map_view` reads them)."""
        smoothed = self.cascade_and_smooth(maps)
        canvas.copy_(torch.cat([level.permute(0, 2, 3, 1).reshape(-1, canvas.shape[1]) for level in smoothed]))
