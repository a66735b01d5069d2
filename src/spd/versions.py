"""The oldest versions of the libraries SPD's code needs, and one check that names what is missing.

Floors follow from the APIs used, not from habit: torchvision 0.23 is the first with
`tv_tensors.KeyPoints` (sparse labels move with their image), which pairs with torch 2.8; torch's
dynamo ONNX exporter with `dynamic_shapes` predates both. CI runs the versions `make` installs
(torch 2.14.1); `pyproject.toml` states these floors and a test holds the two lists equal."""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

from spd.errors import UserInputError

FLOORS = {"torch": "2.8", "torchvision": "0.23", "timm": "1.0"}


def _release(version: str) -> Version:
    """'2.14.1+cu130' -> Version('2.14.1+cu130'), compared as pip compares (`packaging.version`): a
    pre-release sorts below its release ('0.22rc9' < '0.22' < '0.23'); a local tag ('+cu130') is a
    build of its release. An unparsable string compares as 0 (too old), never as a pass."""
    try:
        return Version(version)
    except InvalidVersion:
        return Version("0")


def too_old(installed: dict[str, str] | None = None) -> list[str]:
    """'name X found, Y or newer needed' for each library below its floor (installed: name -> version,
    default this environment's)."""
    problems = []
    for name, floor in FLOORS.items():
        try:
            version = installed[name] if installed is not None else metadata.version(name)
        except (KeyError, metadata.PackageNotFoundError):
            continue  # not installed at all: its import fails with its own clear error
        if _release(version) < _release(floor):
            problems.append(f"{name} {version} found, {floor} or newer needed")
    return problems


def require_supported_versions() -> None:
    """UserInputError (one line, exit 2) naming every library older than SPD's code needs."""
    problems = too_old()
    if problems:
        raise UserInputError("; ".join(problems) + ' (pip install -U "torch>=2.8" "torchvision>=0.23")')
