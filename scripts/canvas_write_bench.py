"""The exported canvas write's forms alone on ONNX Runtime: each form's graph (the forms made once from
random queries, then five layer writes, 6300 canvas rows x d = 192, v15's canvas at 480x640) timed
alternately in one process at each K, with the largest difference from the first form relative to its
largest value.

    python scripts/canvas_write_bench.py [--forms matmul,touched,blocked32,float64] [--k 1,256,512,1024,4096]

Forms: `touched` (`touched_rows_canvas_write`, the exported form below K = 512), `blockedN`
(`blocked_prefix_canvas_sum` in blocks of N, the form from there), and two earlier forms kept here to
compare against: `matmul` (one MatMul per layer, below K = 512 until the touched-rows form) and
`float64` (a float64 prefix over all contributions, from K = 512 in commit 0424626).
Two intra-op threads, the bench's session options; median ms of 7 runs after 2 warm-ups.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from spd.cli.args import k_list
import torch

from spd.models import rows as R

CANVAS_ROWS, WIDTH, LAYERS = 6300, 192, 5


def matmul_canvas_sum(canvas_rows: torch.Tensor, weights: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """The MatMul form (commits 214a089 to 6f0f41b below K = 512): S @ written with S[r, q] the sum of
    query q's weights at row r, S built by a 1-D scatter of the M weights into zeros, its (R x K)
    arithmetic mostly on zeros. canvas_rows, weights (M,) in query order, written (K, d) -> (R, d)."""
    num_queries = written.shape[0]
    corners = canvas_rows.shape[0] // num_queries
    entry = canvas_rows * num_queries + torch.arange(canvas_rows.shape[0]) // corners
    matrix = R.add_rows(weights.new_zeros(CANVAS_ROWS * num_queries), entry, weights)
    return torch.matmul(matrix.view(CANVAS_ROWS, num_queries), written)


def float64_prefix_canvas_sum(forms: R.CanvasWriteForms, written: torch.Tensor) -> torch.Tensor:
    """Prefix sums over all M contributions in float64: (M, d) float64 product and cumulative sum."""
    contributions = written.double().index_select(0, forms.query) * forms.weight.double()[:, None]
    prefix = contributions.cumsum(0)
    return (prefix.index_select(0, forms.through) - prefix.index_select(0, forms.before)).to(written.dtype)


class CanvasWrites(torch.nn.Module):
    """(canvas_rows (K * 12,), soft_beta (1, K, 3, 4, 1), written (K, d)) -> the sum of five layer writes (R, d)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, canvas_rows, soft_beta, written):
        forms = R.canvas_write_forms(canvas_rows, soft_beta, CANVAS_ROWS)
        total = written.new_zeros(CANVAS_ROWS, WIDTH)
        for layer in range(LAYERS):
            layer_written = written * (1.0 + layer)
            if self.form == "matmul":
                total = total + matmul_canvas_sum(canvas_rows, soft_beta.reshape(-1), layer_written)
            elif self.form == "touched":
                total = R.touched_rows_canvas_write(total, forms, layer_written)
            elif self.form == "float64":
                total = total + float64_prefix_canvas_sum(forms, layer_written)
            else:
                block = int(self.form.removeprefix("blocked"))
                total = total + R.blocked_prefix_canvas_sum(forms.query, forms.weight, forms.through, forms.before,
                                                            layer_written, block)
        return total


def random_inputs(num_queries: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, CANVAS_ROWS, (num_queries * 12,), generator=generator),
            torch.rand(1, num_queries, 3, 4, 1, generator=generator), torch.randn(num_queries, WIDTH, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="matmul,touched,blocked32,float64")
    parser.add_argument("--k", type=k_list, default=k_list("1,256,512,1024,4096"), help="comma-separated query counts")
    args = parser.parse_args()
    import onnxruntime as ort

    from spd.export.runtime import session_options

    forms = args.forms.split(",")
    unknown = [form for form in forms if form not in ("matmul", "touched", "float64")
               and not (form.startswith("blocked") and form.removeprefix("blocked").isdigit())]
    if unknown:
        parser.error(f"unknown forms {unknown}: choose from matmul, touched, float64, blockedN (e.g. blocked32)")
    ks = list(args.k)
    generator = torch.Generator().manual_seed(0)
    dims = ({0: torch.export.Dim("contributions")}, {1: torch.export.Dim("k")}, {0: torch.export.Dim("k_written")})
    sessions = {}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for form in forms:
            path = str(Path(folder) / f"{form}.onnx")
            torch.onnx.export(CanvasWrites(form), random_inputs(64, generator), path, dynamo=True,
                              dynamic_shapes=dims, verbose=False)
            sessions[form] = ort.InferenceSession(path, session_options(ort, 2), providers=["CPUExecutionProvider"])
    names = [node.name for node in sessions[forms[0]].get_inputs()]
    print("canvas write ms (median of 7, forms alternating): K, " + ", ".join(forms))
    for k in ks:
        feed = dict(zip(names, (t.numpy() for t in random_inputs(k, generator))))
        times: dict[str, list[float]] = {form: [] for form in forms}
        outputs = {}
        for _ in range(9):
            for form in forms:
                start = time.perf_counter()
                outputs[form] = sessions[form].run(None, feed)[0]
                times[form].append((time.perf_counter() - start) * 1e3)
        first = outputs[forms[0]]
        difference = max(float(np.abs(outputs[form] - first).max() / np.abs(first).max()) for form in forms)
        print(f"{k:6d}" + "".join(f"{statistics.median(times[form][2:]):10.1f}" for form in forms)
              + f"   differ by {difference:.1e}")


if __name__ == "__main__":
    main()
