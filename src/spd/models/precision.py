"""bf16 inference with the weights cast once, not in every call.

Under `torch.autocast` every Linear / Conv weight is cast to bf16 each time it is used (autocast's
weight cache is not used under `inference_mode`): for v15 that is ~28 M encoder numbers per image,
~15-20 ms on the 2-core CPU — about as much as the bf16 encoder gains on some stages. A
*low-precision copy* stores those weights in bf16 once and still runs under autocast, which casts the
activations as before, so every matmul and convolution sees the same bf16 operands as plain
autocast, and every fp32 island stays fp32:

- ops autocast runs in fp32 (LayerNorm, softmax) cast their inputs up as before; norm weights and
  every other parameter keep fp32;
- modules marked with `keep_fp32` (MSDA's sampling-offset and attention-weight projections, which
  run with autocast off) keep fp32 weights;
- the depth heads take `exp` in fp32 (`spd.models.heads.exp_fp32`).

Only for inference: the copy is not meant to be trained (its bf16 weights would lose updates).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_KEEP_FP32 = "_spd_keep_fp32"
_LOW_COPY = "_spd_low_copy"
_LOW_PRECISION_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def keep_fp32(*modules: nn.Module, low_copy: bool = False) -> None:
    """Marks modules whose weights `low_precision_copy` leaves in fp32 (they run with autocast off, or
    their weight is scaled in fp32 first). `low_copy`: the copy also stores the weight in the low
    dtype once, as a buffer `weight_low`, for the calls that use it unscaled (`low_precision_weight`)."""
    for module in modules:
        setattr(module, _KEEP_FP32, True)
        setattr(module, _LOW_COPY, low_copy)


def low_precision_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """module's weight in `dtype`: its `weight_low` copy when `low_precision_copy` made one in that
    dtype, else the weight itself (a matmul under autocast then casts it)."""
    low = getattr(module, "weight_low", None)
    return low if low is not None and low.dtype == dtype else module.weight


def low_precision_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A deep copy of `model` in eval mode with the Linear / Conv weights and biases stored in `dtype`
    (except `keep_fp32` modules). Run it under `torch.autocast(..., dtype=dtype)`: the result equals
    plain autocast on the original up to the order of float rounding. `model` is left unchanged."""
    low = copy.deepcopy(model).eval()
    for module in low.modules():
        if not isinstance(module, _LOW_PRECISION_TYPES):
            continue
        if not getattr(module, _KEEP_FP32, False):
            module.to(dtype)
        elif getattr(module, _LOW_COPY, False):
            module.register_buffer("weight_low", module.weight.detach().to(dtype), persistent=False)
    _cast_low_buffers(low, dtype)
    return low


def low_precision_buffers(module: nn.Module, *names: str) -> None:
    """Marks constant buffers of `module` that only ever meet low-precision operands in a matmul and
    are exact in bf16 (e.g. bilinear x2 weights, multiples of 1/16): `low_precision_copy` stores them
    in its dtype, so no call casts them."""
    setattr(module, "_spd_low_buffers", names)


def _cast_low_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        for name in getattr(module, "_spd_low_buffers", ()):
            buffer = getattr(module, name)
            low = buffer.to(dtype)
            if not torch.equal(low.to(buffer.dtype), buffer):
                raise ValueError(f"buffer {name} of {type(module).__name__} is not exact in {dtype}")
            setattr(module, name, low)
