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
hold them equal).

Where it runs is decided once per process and dtype by `onednn_runs`: an x86-64 CPU (on aarch64
PyTorch's oneDNN goes through ACL, where fused inner products have fallen back to reference kernels:
not measured here, so not used), the instruction set oneDNN needs for bf16 (PyTorch's own check), and
a tiny probe call that must run and agree with `F.linear`. An AVX2-only CPU (or
`ONEDNN_MAX_CPU_ISA=AVX2`) has no bf16 inner product: bf16 then runs `F.linear` under autocast. Below
AVX-512 (the CPU's, PyTorch's or oneDNN's own cap), fp32 runs `F.linear` too, because there MKL's sgemm
is the faster kernel (measured). If a call still fails, that dtype falls back to `F.linear` for the rest
of the process, with one warning.
SPD's decoder layers are `Linear`s; `OneDNNLinears` routes a third-party model's
`nn.Linear` layers the same way: the Depth Anything baseline runs under it, so both models of
`spd bench` run the same GEMM kernels.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_X86_64 = ("x86_64", "amd64")
_failed: set[torch.dtype] = set()  # dtypes whose oneDNN call failed in this process: F.linear from then on


def fused_linear_kernel():
    """PyTorch's private fused linear op (what TorchInductor emits on CPU), or None in a build without it."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None


def _bf16_instructions() -> bool:
    """Whether the CPU has the instructions oneDNN's bf16 kernels need (PyTorch's own check:
    avx512bw/vl/dq at least); False where the check itself is missing."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def onednn_available() -> bool:
    """Whether this process may use oneDNN's fused linear at all: an x86-64 CPU and a PyTorch build
    with oneDNN and the kernel. Asked once."""
    return (
        platform.machine().lower() in _X86_64
        and torch.backends.mkldnn.is_available()
        and fused_linear_kernel() is not None
    )


@functools.cache
def _avx512() -> bool:
    """Whether PyTorch runs this CPU at AVX-512 level (False under ATEN_CPU_CAPABILITY=avx2 or below).
    Asked once: `onednn_runs` consults it on every linear call."""
    try:
        return "AVX512" in torch.backends.cpu.get_cpu_capability().upper()
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _onednn_capped_below_avx512() -> bool:
    """Whether oneDNN's instruction set is capped below AVX-512 by its own setting
    (`ONEDNN_MAX_CPU_ISA`, or the older `DNNL_MAX_CPU_ISA`, read once by oneDNN as it loads) while
    PyTorch's kernels may still run AVX-512. PyTorch exposes no query for oneDNN's effective fp32
    instruction set, so the setting is read as oneDNN documents it: AVX512_* and AVX10_* keep
    AVX-512, ALL / DEFAULT / unset impose no cap, anything else (SSE41, AVX, AVX2, AVX2_VNNI...) is
    below it."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return bool(isa) and isa not in ("ALL", "DEFAULT") and not isa.startswith(("AVX512", "AVX10"))


def _slower_than_f_linear(dtype: torch.dtype) -> bool:
    """Measured, not guessed: oneDNN's fp32 inner product runs 2.4x MKL's sgemm on an AVX-512 Zen 5
    (231 vs 95 GMAC/s) but 0.8x on an AVX2-only EPYC (70 vs 86 GMAC/s; SPD's encoder 12 % slower),
    so below AVX-512 fp32 stays on F.linear. Below AVX-512 means PyTorch's capability or oneDNN's own
    cap: on an AVX-512 Zen 4 with `ONEDNN_MAX_CPU_ISA=SSE41` oneDNN ran the encoder's first MLP layer
    at 37 GMAC/s against F.linear's 90 (78 against 91 with `=AVX2`). A speed choice, not a failure:
    no warning."""
    return dtype == torch.float32 and (not _avx512() or _onednn_capped_below_avx512())


@functools.cache
def kernel_problem(dtype: torch.dtype) -> str | None:
    """None when a tiny fused linear + GELU in `dtype` runs and matches F.linear; else why not."""
    if dtype == torch.bfloat16 and not _bf16_instructions():
        return ("this CPU has no bf16 inner product in oneDNN (it needs AVX-512 or AMX), and bf16 matmuls are much "
                "slower than fp32 here (5 vs 86 GMAC/s measured on an AVX2 CPU): prefer fp32")
    generator = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(*shape, generator=generator, dtype=dtype) for shape in ((4, 32), (16, 32)))
    bias = torch.randn(16, generator=generator)  # fp32 as `linear` passes it in bf16 too (see there)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            fused = _as(fused_linear_kernel()(x, weight, bias, "gelu", [], "none"), torch.float32)
            plain = F.gelu(F.linear(_as(x, torch.float32), _as(weight, torch.float32), bias))
    except RuntimeError as err:
        return f"oneDNN's linear failed its probe ({str(err).splitlines()[0]})"
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(fused, plain, rtol=tolerance, atol=tolerance):
        return "oneDNN's linear disagreed with F.linear in its probe"
    return None


def onednn_runs(dtype: torch.dtype) -> bool:
    """The one routing rule: oneDNN's fused linear in `dtype` is known to run right here (decided once
    per process and dtype; a failure warns once and sends that dtype to `F.linear`)."""
    if dtype not in _ONEDNN_DTYPES or dtype in _failed or not onednn_available() or _slower_than_f_linear(dtype):
        return False
    reason = kernel_problem(dtype)
    if reason is not None:
        _give_up(dtype, reason)
        return False
    return True


def _give_up(dtype: torch.dtype, reason: str) -> None:
    if dtype not in _failed:
        _failed.add(dtype)
        warnings.warn(f"spd: {dtype} linear layers run F.linear, not oneDNN: {reason}", RuntimeWarning, stacklevel=3)


def kernel_report() -> dict[str, str]:
    """Which linear kernel each inference dtype runs in this process (for `spd bench`)."""
    return {name: ("oneDNN" if onednn_runs(dtype) else "F.linear") for name, dtype in (("fp32", torch.float32),
                                                                                          ("bf16", torch.bfloat16))}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` computes in: autocast's on x's device when it is on (it casts every
    operand), else x's own. Ops that feed a matmul write their result in it (`out=`) instead of casting."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def takes_onednn(x: torch.Tensor) -> bool:
    """Whether `linear(x, ...)` runs through oneDNN (see the module docstring for when it does)."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and onednn_runs(compute_dtype(x))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           fp32_bias: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by the exact (erf) GELU when `gelu`.

    Through oneDNN (GELU fused into the matmul) when `takes_onednn(x)`, casting the operands as
    autocast would; otherwise, or when the dtypes disagree outside autocast (F.linear's error then),
    `F.linear` and the GELU (in place without autograd). Same numbers up to float rounding (tests:
    <= 1e-5 relative in fp32). Shape: x (..., in), weight (out, in), bias (out,) -> (..., out).

    fp32_bias: on oneDNN an fp32 bias stays fp32 in a bf16 call (added to the fp32 accumulator; the
    probe checks it may): for a bias made in fp32 in every call (the encoder's folded GRN bias),
    which would otherwise be cast every call. Not for layers whose autocast result must match.
    """
    if not takes_onednn(x) or not _dtypes_agree(x, weight, bias):
        out = F.linear(x, weight, bias)
        if not gelu:
            return out
        return F.gelu(out) if torch.is_grad_enabled() else torch.ops.aten.gelu_(out)
    dtype = compute_dtype(x)
    keep_bias = bias is None or (fp32_bias and bias.dtype == torch.float32)
    operands = [_as(x, dtype), _as(weight, dtype), bias if keep_bias else _as(bias, dtype)]
    try:
        if gelu:
            return fused_linear_kernel()(*operands, "gelu", [], "none")
        return fused_linear_kernel()(*operands, "none", [], "")
    except RuntimeError as err:  # a shape or kernel the probe did not meet: the plain op, from now on
        _give_up(dtype, str(err).splitlines()[0])
        return linear(x, weight, bias, gelu, fp32_bias)


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


def register_flop_formula() -> bool:
    """Teaches torch's FLOP counter (`spd bench`'s MACs) that oneDNN's linear is the matmul it is.
    Uses torch's private FLOP registry: called by the bench, never at import, and False (the MACs of
    oneDNN linears then go uncounted, and the bench says so) where that registry has moved."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula as register
    except ImportError:
        return False
    kernel = fused_linear_kernel()
    if kernel is None:
        return False
    if kernel in flop_registry:
        return True

    @register(kernel)
    def _linear_pointwise_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * x_shape[-1]  # any overload: (..., in) -> (..., out)

    return True
