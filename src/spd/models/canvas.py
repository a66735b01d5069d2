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

from spd.models.splat import SplatPlan, sample_at


def depthwise3x3(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)


class CanvasSublayer(nn.Module):
    """One canvas write-cascade-smooth-read step.

    Shape:
        forward: h (B, K, d), grid (B, K, 2) normalised, plans (one SplatPlan per level, made once
        per decode call), canvas [L2 (B, d, H/8, W/8), L3 (B, d, H/16, W/16), L4 (B, d, H/32, W/32)]
        -> (read (B, K, d), the updated canvas list). Canvas maps live in channels-last memory:
        depthwise convolutions and sampling are many times faster that way on CPU.
        `fast` (inference, no autograd) runs `_forward_fast`: the same maths in fewer passes over
        the maps, updating the given maps in place.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.write = nn.Linear(d_model, d_model)
        self.gate_l4_to_l3_fine = depthwise3x3(d_model)
        self.gate_l4_to_l3_coarse = depthwise3x3(d_model)
        self.gate_l3_to_l2_fine = depthwise3x3(d_model)
        self.gate_l3_to_l2_coarse = depthwise3x3(d_model)
        self.smooth = nn.ModuleList(depthwise3x3(d_model) for _ in range(3))
        self.read_gate = nn.Linear(d_model, 3)
        self.read = nn.Linear(3 * d_model, d_model)

    def forward(
        self,
        h: torch.Tensor,
        grid: torch.Tensor,
        plans: list[SplatPlan],
        canvas: list[torch.Tensor],
        fast: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if fast:
            return self._forward_fast(h, plans, canvas)
        # 1. Write: soft mean, so empty cells stay unchanged and magnitude does not grow with K.
        written = self.write(h)
        updated = []
        for level, plan in zip(canvas, plans):
            updated.append(level + plan.splat(written) / (plan.weight_sum + 1.0))
        l2, l3, l4 = updated
        # 2. Joint-gate cascade, coarse to fine (the plan's §6.4 code).
        l4_up = F.interpolate(l4, size=l3.shape[-2:], mode="bilinear", align_corners=False)
        l3 = l3 + torch.sigmoid(self.gate_l4_to_l3_fine(l3) + self.gate_l4_to_l3_coarse(l4_up)) * l4_up
        l3_up = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        l2 = l2 + torch.sigmoid(self.gate_l3_to_l2_fine(l2) + self.gate_l3_to_l2_coarse(l3_up)) * l3_up
        # 3. Smooth: one depthwise step lets neighbouring cells (and so nearby queries) mix.
        canvas = [level + smooth(level) for level, smooth in zip((l2, l3, l4), self.smooth)]
        # 4. Read: each level scaled by its own query-dependent gate.
        gates = torch.sigmoid(self.read_gate(h))  # (B, K, 3)
        reads = [sample_at(level, grid) * gates[..., i : i + 1] for i, level in enumerate(canvas)]
        return self.read(torch.cat(reads, dim=-1)), canvas

    def _forward_fast(
        self, h: torch.Tensor, plans: list[SplatPlan], canvas: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` for inference. The write touches only the queries' cells (`add_soft_mean_`),
        gates and residuals are updated in place, `level + smooth(level)` is one convolution with
        1 added to the kernel centre, and the reads are gathers with the read gate folded into the
        bilinear weights. Modifies the given maps: the caller passes maps it owns."""
        written = self.write(h)
        l2, l3, l4 = (plan.add_soft_mean_(level, written) for level, plan in zip(canvas, plans))
        l4_up = F.interpolate(l4, size=l3.shape[-2:], mode="bilinear", align_corners=False)
        gate = self.gate_l4_to_l3_fine(l3).add_(self.gate_l4_to_l3_coarse(l4_up)).sigmoid_()
        l3 = l3.addcmul_(gate, l4_up)
        l3_up = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        gate = self.gate_l3_to_l2_fine(l2).add_(self.gate_l3_to_l2_coarse(l3_up)).sigmoid_()
        l2 = l2.addcmul_(gate, l3_up)
        canvas = [_depthwise_plus_identity(level, smooth) for level, smooth in zip((l2, l3, l4), self.smooth)]
        gates = torch.sigmoid(self.read_gate(h))  # (B, K, 3)
        reads = [plan.read(level, gates[..., i]) for i, (level, plan) in enumerate(zip(canvas, plans))]
        return self.read(torch.cat(reads, dim=-1)), canvas


def _depthwise_plus_identity(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """x + conv(x) for a depthwise 3x3 conv, as one convolution (identity = 1 at the kernel centre)."""
    weight = conv.weight.clone()
    weight[:, :, 1, 1] += 1.0
    return F.conv2d(x, weight, conv.bias, padding=1, groups=conv.groups).contiguous(memory_format=torch.channels_last)
