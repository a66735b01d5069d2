"""Linear layers through oneDNN on CPU at inference: the same maths as `F.linear`, in a faster kernel.

PyTorch runs an fp32 `F.linear` on CPU through MKL's sgemm, which picks its code path by CPU vendor
and takes a slower one on AMD CPUs; oneDNN (bundled with PyTorch, already behind every convolution
and every bf16 matmul) picks its kernels by instruction set. Measured on the 2-core AMD EPYC (AVX-512)
this project is benchmarked on: a (19200 x 96) @ (96 x 384) fp32 linear, ConvNeXt V2's first MLP
layer at 480x640, takes 7.3 ms in MKL (97 GMAC/s) and 3.5 ms in oneDNN (203 GMAC/s); the folded fp32
encoder drops from ~330 to ~195 ms. bf16 linears already run in oneDNN; here they gain a fused GELU.

The kernel is `torch.ops.mkldnn._linear_pointwise`, the one TorchInductor emits for CPU linears with
fused activations. It is private and has no autograd formula, so `linear` takes it only where it is
present, on CPU, without autograd, outside torch.compile / torch.export tracing (their graphs make
their own kernel choices), in fp32 or bf16; everywhere else it is `F.linear`, the reference (tests
hold them equal). SPD's decoder layers are `Linear`s; `OneDNNLinears` routes a third-party model's
`nn.Linear` layers the same way: the Depth Anything baseline runs under it, so both models of
`spd bench` run the same GEMM kernels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import flop_registry, register_flop_formula

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear kernel (x86 builds do). Asked once: every
    linear call checks it."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` computes in here: autocast's when it is on (it casts every operand)."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def takes_onednn(x: torch.Tensor) -> bool:
    """Whether `linear(x, ...)` runs through oneDNN (see the module docstring for when it does)."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _compute_dtype(x) in _ONEDNN_DTYPES
        and onednn_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by the exact (erf) GELU when `gelu`.

    Through oneDNN (GELU fused into the matmul) when `takes_onednn(x)`, casting the operands as
    autocast would; otherwise, or when the dtypes disagree outside autocast (F.linear's error then),
    `F.linear` and the GELU (in place without autograd). Same numbers up to float rounding (tests:
    <= 1e-5 relative in fp32). Shape: x (..., in), weight (out, in), bias (out,) -> (..., out).
    """
    if not takes_onednn(x) or not _dtypes_agree(x, weight, bias):
        out = F.linear(x, weight, bias)
        if not gelu:
            return out
        return F.gelu(out) if torch.is_grad_enabled() else torch.ops.aten.gelu_(out)
    dtype = _compute_dtype(x)
    x, weight, bias = (_as(t, dtype) for t in (x, weight, bias))
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dtypes_agree(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Under autocast any float operands are cast; outside it they must match, as F.linear requires."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """tensor in dtype, with no op at all when it already is (a no-op `.to` still costs a dispatch)."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) whose forward is `linear`: oneDNN at CPU
    inference, `F.linear` in training and everywhere else. SPD's decoder is built from these: fp32
    decode(K) measured 12-15 % faster at K = 256-4096 on the 2-core AMD CPU; bf16 unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNLinears(TorchFunctionMode):
    """Within this block every `F.linear` call (so every `nn.Linear` layer) goes through `linear`:
    oneDNN where it can, `F.linear` elsewhere. For models whose code is not ours (the baseline)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # the mode is off inside this handler: `linear`'s own F.linear does not recurse
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def _register_flop_formula() -> None:
    """torch's FLOP counter (`spd bench`'s MACs) counts oneDNN's linear as the matmul it is."""
    kernel = torch.ops.mkldnn._linear_pointwise
    if kernel in flop_registry:
        return

    @register_flop_formula(kernel)
    def _linear_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * x_shape[-1]  # any overload: (..., in) -> (..., out)


if onednn_available():
    _register_flop_formula()
