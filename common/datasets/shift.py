"""Distribution shift for a YOLO-layout dataset: a copy of its images under one COCO-C corruption.

Edge cameras see what a pretrained model did not (fog, low contrast, sensor noise): a shifted copy of
held-out images is where learning from the edges can be measured. The corruptions are those of
Hendrycks & Dietterich's ImageNet-C as packaged for COCO by ``imagecorruptions`` (the maintained
``imagecorruptions-imaug`` fork, which works with numpy 2). Labels are copied unchanged: none of
the 19 corruptions moves an object.

Every image is corrupted with numpy's global generator seeded from its file name (the library draws
from it), so the same source always gives the same bytes, whatever the order or the machine.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.constants import CORRUPTIONS, SEVERITIES
from common.datasets.yolo import decode_image, discover_images, img2label_path
from common.errors import DatasetError

JPEG_QUALITY = 95


@dataclass(frozen=True)
class Shift:
    """One corruption at one severity, written ``NAME:SEVERITY`` on command lines."""

    corruption: str
    severity: int

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise DatasetError(f"unknown corruption {self.corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
        if self.severity not in SEVERITIES:
            raise DatasetError(f"severity must be 1..5, got {self.severity}")

    @classmethod
    def parse(cls, text: str) -> Shift:
        name, sep, level = text.partition(":")
        if not sep or not level.strip().isdigit():
            raise DatasetError(f"a shift is NAME:SEVERITY (e.g. contrast:5), got {text!r}")
        return cls(name.strip(), int(level))

    def __str__(self) -> str:
        return f"{self.corruption}:{self.severity}"


def seed_of(name: str) -> int:
    """A 32-bit seed from a file name: the same image is corrupted the same way everywhere."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def corrupt_image(path: Path, shift: Shift) -> np.ndarray:
    """The upright RGB image under the corruption, as uint8 ``[H, W, 3]``."""
    from imagecorruptions import corrupt  # heavy (numba, OpenCV): only the data tool needs it

    pixels = np.asarray(decode_image(path))
    np.random.seed(seed_of(path.name))
    out = corrupt(pixels, corruption_name=shift.corruption, severity=shift.severity)
    # Some corruptions return float arrays or drop a pixel of size (frost, zoom): back to the input's shape.
    out = np.clip(np.asarray(out, dtype=np.float64), 0, 255).astype(np.uint8)
    return out[: pixels.shape[0], : pixels.shape[1]]


def shift_dataset(
    src: Path, dst: Path, shift: Shift, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """``dst`` mirrors ``src``'s layout: every image corrupted (JPEG), labels and other files copied.
    Refuses to write into ``src`` or into a non-empty ``dst`` (nothing is overwritten)."""
    src, dst = Path(src), Path(dst)
    images = discover_images(src)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DatasetError(f"the shifted copy {dst} must lie outside its source {src}")
    if dst.exists() and any(dst.iterdir()):
        raise DatasetError(f"{dst} exists and is not empty: choose a new folder")
    root = src if src.is_dir() else src.parent
    written = shift_images(images, root, dst, shift, progress)
    for extra in ("names.yaml", "data.yaml"):
        if (root / extra).is_file():
            shutil.copy2(root / extra, dst / extra)
    return written


def shifted_path(image: Path, root: Path, dst: Path) -> Path:
    """Where :func:`shift_images` writes ``image`` (a file under ``root``)."""
    return (dst / image.relative_to(root)).with_suffix(".jpg")


def shift_images(
    images: list[Path], root: Path, dst: Path, shift: Shift, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Each image under ``root`` corrupted into the same place under ``dst``, its label beside it."""
    from PIL import Image

    written = []
    for done, image in enumerate(images, 1):
        target = shifted_path(image, root, dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(corrupt_image(image, shift)).save(target, quality=JPEG_QUALITY)
        copy_label(image, root, dst)
        written.append(target)
        if progress is not None:
            progress(done, len(images))
    return written


def copy_label(image: Path, root: Path, dst: Path) -> None:
    label = img2label_path(image)
    if label.is_file():
        target = dst / label.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(label, target)
