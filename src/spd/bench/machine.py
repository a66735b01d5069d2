"""What machine a benchmark ran on: the CPU's model and the instruction sets that decide its kernels,
any cap set on them, and which linear kernel each dtype ran. Every bench record carries this, since
figures from different CPUs are not comparable."""

from __future__ import annotations

import os
import platform

import torch

from spd.models.onednn import kernel_report

# The flags that change which kernels run (x86): AVX2 / AVX-512 width, bf16 dot products, AMX tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) from /proc/cpuinfo on Linux; (None, empty) elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None, set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name"), set(fields.get("flags", fields.get("Features", "")).split())


def cpu_facts() -> dict:
    """CPU model, its kernel-relevant instruction-set flags, PyTorch's chosen capability, any caps set."""
    model, flags = _cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "isa_flags": [flag for flag in ISA_FLAGS if flag in flags],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "caps": {name: os.environ[name] for name in ISA_CAPS if name in os.environ},
    }


def kernel_facts() -> dict:
    """Which kernel the inference linears of each dtype run in this process (`spd.models.onednn`)."""
    return {"linear": kernel_report()}


def format_machine(result: dict) -> str:
    cpu, linear = result["cpu"], result["kernels"]["linear"]
    caps = ", ".join(f"{k}={v}" for k, v in cpu["caps"].items()) or "none"
    return (f"cpu {cpu['model']} ({cpu['machine']}; {' '.join(cpu['isa_flags']) or 'no AVX2'}; PyTorch kernels "
            f"{cpu['aten_capability']}; caps {caps}); linear kernels: fp32 {linear['fp32']}, bf16 {linear['bf16']}")
