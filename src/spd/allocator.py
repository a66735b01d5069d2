"""glibc malloc settings for CPU inference: freed memory is kept for the next call instead of being
returned to the OS and faulted back in, page by page, on the next one.

Why: PyTorch's CPU tensors come straight from malloc (there is no caching allocator as on CUDA).
glibc serves every allocation above its mmap threshold (dynamic, 128 KiB up to 32 MiB) with fresh
pages from the OS and unmaps them when the tensor is freed, so each call of a model faults its large
temporaries in again, 4 KiB at a time. Measured on the 2-core CPU (v15, 480x640, fp32): one
decode(K=4096) took ~177,000 minor page faults and ~465 ms with glibc's defaults, ~11,000 and
~265 ms with the settings below. The cost: the process keeps up to `TRIM_THRESHOLD` of freed
memory (in practice its peak working set) instead of handing it back at once.

The `spd` command applies this at start of its inference commands (predict, eval, bench, serve,
export) unless SPD_MALLOC=default, never for training or the data tools: a training run's DataLoader
workers would inherit it and each keep their freed memory (measured: 353 MiB kept resident after
freeing 150 x 16 MiB, against 1 MiB with glibc's defaults). Python users call
`spd.tune_cpu_allocator()` once (it changes the whole process, so it is never implicit).
`spd bench` records the setting it ran with. Other C libraries (musl, macOS): nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

from spd.errors import UserInputError

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit: up to here, the heap
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap kept before any is returned to the OS
# A long-lived server keeps less: a burst of large uploads must not leave it at the burst's peak
# (with 1 GiB, forty 6000x6000 PNG uploads left `spd serve` ~1 GB above idle for good).
SERVING_TRIM_THRESHOLD = 128 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)

_state = {"tuned": False, "trim_threshold": TRIM_THRESHOLD}


def tune_cpu_allocator(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Sets glibc's M_MMAP_THRESHOLD (32 MiB) and M_TRIM_THRESHOLD (`trim_threshold`, 1 GiB; `spd serve`
    uses SERVING_TRIM_THRESHOLD) for this process. Returns
    whether it did (False off glibc, or when SPD_MALLOC=default). Calling it again is harmless.
    Raises UserInputError when SPD_MALLOC holds anything but "default" or "tuned" (a typo)."""
    if requested_setting() == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    tuned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    _state["tuned"] = _state["tuned"] or tuned
    _state["trim_threshold"] = trim_threshold if tuned else _state["trim_threshold"]
    return tuned


def requested_setting() -> str:
    """SPD_MALLOC's value, "tuned" when unset; UserInputError for anything but "default" or "tuned"."""
    setting = os.environ.get("SPD_MALLOC", "tuned")
    if setting not in ("default", "tuned"):
        raise UserInputError(f"SPD_MALLOC must be 'default' or 'tuned' (or unset); got {setting!r}")
    return setting


def allocator_setting() -> dict:
    """What this process runs with, for benchmark records."""
    if _state["tuned"]:
        return {"malloc": "glibc, tuned", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": _state["trim_threshold"]}
    return {"malloc": "default"}


def release_free_memory() -> bool:
    """Hands the heap's free pages back to the OS now (glibc `malloc_trim(0)`), whatever the trim
    threshold. `spd serve` calls it when its decoding pool goes idle after a large image, so that a burst
    of big uploads does not leave the server at its peak. Returns whether it ran (False off glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    malloc_trim(0)
    return True
