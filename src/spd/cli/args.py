"""Argument types shared by the sub-commands: each turns one command-line string into a checked
value or raises `argparse.ArgumentTypeError` with the message argparse prints in its one line."""

from __future__ import annotations

import argparse
import math


def image_size(text: str) -> tuple[int, int]:
    """'480x640' -> (480, 640): height x width, each at least 32."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x640 (HxW), got {text!r}") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return height, width


def int_at_least(minimum: int, text: str) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(1, text)


def non_negative_int(text: str) -> int:
    return int_at_least(0, text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def k_list(text: str) -> tuple[int, ...]:
    """'1,16,256' -> (1, 16, 256): query counts."""
    try:
        ks = tuple(positive_int(k) for k in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}") from None
    return ks


def device(text: str) -> str:
    """cpu, cuda or cuda:N, and present on this machine."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu, cuda or cuda:N)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    value = int_at_least(1, text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text!r}")
    return value


def check_output_file(path: str | None, flag: str) -> None:
    """Before any work: a file the command will write must have an existing folder and not be a folder
    itself (UserInputError naming the flag), so that minutes of work are not lost at the end."""
    if path is None:
        return
    from pathlib import Path

    from spd.errors import UserInputError

    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"{flag} {path}: is a folder; give a file name")
    _check_parent(target, flag, path)


def _check_parent(target, flag: str, path: str) -> None:
    from spd.errors import UserInputError

    parent = target.parent
    if parent.is_file() or any(p.is_file() for p in parent.parents):
        raise UserInputError(f"{flag} {path}: {next(p for p in (parent, *parent.parents) if p.is_file())} is a file, "
                             "not a folder")
    if not parent.is_dir():
        raise UserInputError(f"{flag} {path}: folder {parent} does not exist (create it first)")


def check_output_suffix(path: str | None, flag: str, suffixes: tuple[str, ...]) -> None:
    """Before any work: an output file's extension must be one the command writes."""
    if path is None:
        return
    from pathlib import Path

    from spd.errors import UserInputError

    if Path(path).suffix.lower() not in suffixes:
        raise UserInputError(f"{flag} {path}: writes {' or '.join(suffixes)} files only (by the extension), not "
                             f"{Path(path).suffix or 'a name without one'!r}")


def check_output_folder(path: str, flag: str) -> None:
    """Before any work: a folder the command will create (with its missing parents) or replace must not
    be a file, nor lie under one."""
    from pathlib import Path

    from spd.errors import UserInputError

    target = Path(path)
    if target.is_file():
        raise UserInputError(f"{flag} {path}: is a file; give a folder")
    under_file = next((p for p in target.parents if p.is_file()), None)
    if under_file is not None:
        raise UserInputError(f"{flag} {path}: {under_file} is a file, not a folder")


def check_depth_range(min_depth: float, max_depth: float) -> None:
    from spd.errors import UserInputError

    if not min_depth < max_depth:
        raise UserInputError(f"--min-depth {min_depth:g} must be below --max-depth {max_depth:g}")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_inference_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast inference (default fp32)")
