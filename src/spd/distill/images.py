"""The unlabelled images of a labelling job: a folder (recursive) or a list file, in a stable order,
checked before any work.

Every image's header is read first (format, size after its EXIF orientation): a folder with no
image, unreadable files or images of mixed sizes is refused in one line before the teacher runs,
so nothing is half-labelled for a reason found later. Unreadable files stop the job (listed, with a
count) unless `skip_unreadable`, which leaves them out and records them in the manifest: a user who
asks for labels on a folder should learn that some of it was not labelled, not find out in training.
One size: the labels become one training set, and a model is metric at one pixel scale
(`spd.cameras.scale`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from spd.data.io import NOT_PHOTOGRAPHS, read_text  # a teacher would "label" a depth map as a photograph
from spd.errors import DataLayoutError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class SourceImage:
    path: Path  # absolute
    name: str  # relative to the folder or list (posix), unique: names the label file


@dataclass(frozen=True)
class ImageSet:
    source: Path
    images: tuple[SourceImage, ...]
    size: tuple[int, int]  # (H, W), every image's
    skipped: tuple[tuple[str, str], ...] = ()  # (name, why) left out with skip_unreadable


def _listed(source: Path) -> list[SourceImage]:
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [SourceImage(p.resolve(), p.relative_to(source).as_posix()) for p in paths]
    if not source.is_file():
        raise DataLayoutError(f"--images {source}: not found (give a folder of images or a text file listing them)")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        raise DataLayoutError(f"--images {source}: one image; give the folder that holds it, or a list file")
    images = []
    for number, line in enumerate(read_text(source).splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text) if Path(text).is_absolute() else source.parent / text
        images.append(SourceImage(path.resolve(), Path(text).as_posix().lstrip("/")))
    return images


def header_size(path: Path) -> tuple[int, int]:
    """(H, W) as `read_rgb` will give it (EXIF orientation applied), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112)
        if image.mode in NOT_PHOTOGRAPHS:
            raise ValueError(f"a {image.mode} image ({NOT_PHOTOGRAPHS[image.mode]}), not an 8-bit colour photograph")
    return (width, height) if orientation in _ROTATED else (height, width)


def list_images(source: str | Path, skip_unreadable: bool = False) -> ImageSet:
    """The images `source` names, checked: DataLayoutError for an empty set, unreadable files (unless
    skipped), names the description format cannot hold, or mixed sizes."""
    source = Path(source)
    images = _listed(source)
    if not images:
        raise DataLayoutError(f"--images {source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    spaced = [image.name for image in images if any(c.isspace() for c in str(image.path))]
    if spaced:
        raise DataLayoutError(f"--images {source}: {len(spaced)} image path(s) hold whitespace, which a sample list "
                              f"cannot (e.g. {spaced[0]!r}): rename them or list them through a symlinked folder")
    sizes: dict[SourceImage, tuple[int, int]] = {}
    bad: list[tuple[str, str]] = []
    for image in images:
        try:
            sizes[image] = header_size(image.path)
        except FileNotFoundError:
            bad.append((image.name, "file not found"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            bad.append((image.name, " ".join(str(err).split())[:80] or type(err).__name__))
    if bad and not skip_unreadable:
        shown = "; ".join(f"{name} ({why})" for name, why in bad[:3])
        raise DataLayoutError(f"--images {source}: {len(bad)} of {len(images)} files are not readable photographs: {shown}"
                              f"{' ...' if len(bad) > 3 else ''} (fix or remove them, or --skip-unreadable to label the rest)")
    readable = [image for image in images if image in sizes]
    if not readable:
        raise DataLayoutError(f"--images {source}: none of the {len(images)} files is a readable image")
    counts = Counter(sizes[image] for image in readable)
    if len(counts) > 1:
        (common, _), (other, _) = counts.most_common(2)
        example = next(image.name for image in readable if sizes[image] == other)
        listed = ", ".join(f"{w}x{h}: {n}" for (h, w), n in counts.most_common(4))
        raise DataLayoutError(f"--images {source}: images of {len(counts)} sizes ({listed}; e.g. {example} is "
                              f"{other[1]}x{other[0]}): one labelled set has one pixel scale, so resize them to one "
                              "size or label each size into its own --out")
    return ImageSet(source, tuple(readable), next(iter(counts)), tuple(bad))
