"""One canvas layer's gate cascade and smoothing on ONNX Runtime, with three exact forms of its x2
bilinear upsampling, beside PyTorch's in-place cascade: where the exported decoder's K-independent
time goes, and whether the upsampling's form matters.

    python scripts/canvas_cascade_bench.py [--runs 41]

The layer is `CanvasSublayer.cascade_and_smooth` at v15's 480x640 canvas (L2 60x80, L3 30x40, L4 15x20,
d = 192, random weights), exported as the decoder exports it: the canvas rows in, split into maps,
permuted to NCHW, the cascade, and the rows out. Upsampling forms (all bilinear x2, align_corners=False,
the edges clamped):
- `resize`: F.interpolate, ONNX Resize (what the exported decoder uses);
- `nearest_conv`: edge-pad by one cell, nearest x2, crop one cell, a fixed depthwise 3x3 convolution
  with taps [1/4, 1/2, 1/4] per axis (nearest upsampling and convolutions are ops ONNX Runtime's
  blocked NCHWc layout keeps, bilinear Resize is not);
- `matmul`: two MatMuls with the (2n x n) interpolation matrices.
Prints each form's largest difference from PyTorch's output (relative to its largest value) and the
median ms per layer of each form on ONNX Runtime and of PyTorch's in-place cascade on channels-last
views of a canvas buffer (`CanvasSublayer._cascade_and_smooth_in_place`, as decode runs it), timed in
the same rounds, two intra-op threads each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

D_MODEL = 192
SIZES = ((60, 80), (30, 40), (15, 20))  # L2, L3, L4 of v15's canvas at 480x640


def up_resize(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def up_nearest_conv(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 as nearest x2 of the edge-padded map, cropped, then taps [1/4, 1/2, 1/4]: an output
    at 2i takes 1/4 x[i-1] + 3/4 x[i], one at 2i+1 takes 3/4 x[i] + 1/4 x[i+1], the edge clamped."""
    taps = torch.tensor([0.25, 0.5, 0.25])
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    upsampled = F.interpolate(padded, scale_factor=2, mode="nearest")[..., 1:-1, 1:-1]
    return F.conv2d(upsampled, kernel, groups=x.shape[1])


def up_matmul(x: torch.Tensor) -> torch.Tensor:
    from spd.models.ldrm import _upsample_matrix

    height, width = x.shape[-2:]
    return torch.matmul(_upsample_matrix(height), torch.matmul(x, _upsample_matrix(width).t()))


FORMS = {"resize": up_resize, "nearest_conv": up_nearest_conv, "matmul": up_matmul}


class CascadeOnRows(nn.Module):
    """canvas rows (6300, d) -> the same rows after one layer's cascade and smoothing, as exported."""

    def __init__(self, layer: nn.Module, upsample) -> None:
        super().__init__()
        self.layer, self.upsample = layer, upsample

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        maps, start = [], 0
        for height, width in SIZES:
            maps.append(rows[start : start + height * width].view(1, height, width, -1).permute(0, 3, 1, 2))
            start += height * width
        l2, l3, l4 = maps
        layer = self.layer
        l4_up = self.upsample(l4)
        l3 = l3 + torch.sigmoid(layer.gate_l4_to_l3_fine(l3) + layer.gate_l4_to_l3_coarse(l4_up)) * l4_up
        l3_up = self.upsample(l3)
        l2 = l2 + torch.sigmoid(layer.gate_l3_to_l2_fine(l2) + layer.gate_l3_to_l2_coarse(l3_up)) * l3_up
        smoothed = [level + smooth(level) for level, smooth in zip((l2, l3, l4), layer.smooth)]
        return torch.cat([level.permute(0, 2, 3, 1).reshape(-1, rows.shape[1]) for level in smoothed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=41, help="timed runs per form (median)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    import onnxruntime as ort

    from spd.export.runtime import session_options
    from spd.models.canvas import CanvasSublayer
    from spd.models.rows import RowLayout, map_view

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layer = CanvasSublayer(D_MODEL).eval()
    rows = torch.randn(sum(h * w for h, w in SIZES), D_MODEL)
    with torch.no_grad():
        reference = CascadeOnRows(layer, up_resize)(rows).numpy()
    feed = {"rows": rows.numpy()}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, upsample in FORMS.items():
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad():
                torch.onnx.export(CascadeOnRows(layer, upsample), (rows,), str(path), dynamo=True,
                                  input_names=["rows"], output_names=["rows_out"], verbose=False)
            sessions[name] = ort.InferenceSession(str(path), session_options(ort, 2), providers=["CPUExecutionProvider"])
    scale = float(np.abs(reference).max())
    for name, session in sessions.items():
        print(f"{name:13s} differs from PyTorch by {float(np.abs(session.run(None, feed)[0] - reference).max()) / scale:.1e}")
    canvas = rows.clone()
    views = [map_view(canvas, RowLayout(SIZES, (0, 4800, 6000), 1), i) for i in range(3)]

    def in_place() -> None:
        canvas.copy_(rows)  # the same input every run (the cascade adds into its maps); ~0.2 ms of the figure
        layer._cascade_and_smooth_in_place(views)

    runners = {name: (lambda session=session: session.run(None, feed)) for name, session in sessions.items()}
    runners["pytorch_in_place"] = in_place
    # Every round runs each form once, in alternating order: this shared machine's speed drifts by far
    # more than the forms differ, and only figures of the same rounds compare.
    times = {name: [] for name in runners}
    with torch.inference_mode():
        for round_index in range(args.runs + 3):
            order = list(runners.items()) if round_index % 2 else list(runners.items())[::-1]
            for name, run in order:
                start = time.perf_counter()
                run()
                if round_index >= 3:  # the first rounds warm up
                    times[name].append(1000 * (time.perf_counter() - start))
    print("ms per layer (median of rounds that run every form once): "
          + ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items()))

if __name__ == "__main__":
    main()
