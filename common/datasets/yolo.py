"""YOLO-format detection data: images plus ``labels/*.txt`` rows ``class cx cy w h`` (normalized).

Accepts the COCO128 layout (``DIR/images/train2017/*.jpg`` + ``DIR/labels/train2017/*.txt``), the
Sedna example's dataset URL (``/data/1/COCO`` holding ``coco128/images/train2017``), a folder of
images, or a ``.txt`` list of image paths. A label file is found by upstream's path rule (the last
``/images/`` becomes ``/labels/``, the suffix ``.txt``); no label file means no boxes. Unreadable
images and malformed label files never crash a run: the sample reports why and is skipped.
Sample ``i`` is the ``i``-th image in sorted path order (of the selected subset), so every node
agrees on ids and a split by index is reproducible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.datasets.base import BAD_LABELS, UNREADABLE_IMAGE, EdgeSample
from common.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
PAD_COLOR = 114
LABEL_COLUMNS = 5
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the input: ``x_in = x_orig * ratio + pad_x``."""

    ratio: float
    pad: tuple[float, float]  # (left, top), fractional as upstream returns it
    orig_hw: tuple[int, int]
    shape: tuple[int, int]  # input (h, w): square unless rect batches asked for less padding


@dataclass(frozen=True)
class Skipped:
    index: int
    path: str
    reason: str


@dataclass(frozen=True)
class YoloSample:
    """One letterboxed image, or (``image`` None) the reason it could not be used.

    ``labels``: float32 [n, 5] (cls, cx, cy, w, h) normalized to the letterboxed image;
    ``source_labels``: the same boxes normalized to the original image, as read from disk.
    """

    index: int
    path: Path
    image: np.ndarray | None  # float32 CHW in 0..1
    labels: np.ndarray
    source_labels: np.ndarray
    letterbox: Letterbox | None
    error: str = ""


def img2label_path(image: Path) -> Path:
    """Upstream's rule: the last ``/images/`` path component becomes ``/labels/``, suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        text = sb.join(text.rsplit(sa, 1))
    return Path(text).with_suffix(".txt")


def discover_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursively), or listed in a ``.txt`` file, in sorted order."""
    root = Path(root)
    if root.is_file() and root.suffix == ".txt":
        lines = [ln.strip() for ln in root.read_text().splitlines() if ln.strip()]
        paths = [p if p.is_absolute() else root.parent / p for p in map(Path, lines)]
    elif root.is_dir():
        paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:
        paths = [root]
    else:
        raise DatasetError(f"dataset {root} does not exist (expected a folder of images or a .txt list)")
    paths = sorted(paths, key=lambda p: p.as_posix())
    if not paths:
        raise DatasetError(f"dataset {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def read_labels(path: Path) -> np.ndarray:
    """float32 [n, 5] from a label file; polygons become their bounding boxes; duplicates dropped."""
    if not path.is_file():
        return np.zeros((0, LABEL_COLUMNS), np.float32)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{path}:{number}: not numbers: {line.strip()[:60]!r}") from None
        if len(values) > LABEL_COLUMNS and len(values) % 2 == 1 and len(values) >= 7:  # polygon
            xs, ys = values[1::2], values[2::2]
            x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
            values = [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        if len(values) != LABEL_COLUMNS:
            raise DatasetError(f"{path}:{number}: {len(fields)} columns, expected 5 (class cx cy w h)")
        rows.append(values)
    labels = np.array(rows, np.float32).reshape(-1, LABEL_COLUMNS)
    if not np.isfinite(labels).all():
        raise DatasetError(f"{path}: non-finite values")
    if (labels[:, 0] < 0).any() or (labels[:, 0] != np.round(labels[:, 0])).any():
        raise DatasetError(f"{path}: class ids must be non-negative integers")
    if (labels[:, 1:] < 0).any() or (labels[:, 1:] > 1).any():
        raise DatasetError(f"{path}: coordinates must be normalized to 0..1")
    _, first = np.unique(labels, axis=0, return_index=True)
    return labels[np.sort(first)]


def verify_image(path: Path) -> tuple[int, int]:
    """Cheap header check (no full decode), like upstream's dataset scan; the upright (h, w)."""
    with Image.open(path) as im:
        rotated = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
        im.verify()
        w, h = im.size
    if min(w, h) < 10:
        raise ValueError(f"image size {w}x{h} is under 10 pixels")
    return (w, h) if rotated else (h, w)


def letterbox(image: Image.Image, size: int, shape: tuple[int, int] | None = None,
              color: int = PAD_COLOR) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio so the long side is ``size``, pad to ``shape`` (default a square):
    upstream ``letterbox(auto=False)``. Downscaling averages pixel areas (val.py's cv2.INTER_AREA),
    upscaling is bilinear (cv2.INTER_LINEAR); returns uint8 HWC RGB and the mapping back."""
    w0, h0 = image.size
    r = min(size / h0, size / w0)
    new_w, new_h = round(w0 * r), round(h0 * r)
    if (new_w, new_h) != (w0, h0):
        resample = Image.Resampling.BOX if r < 1 else Image.Resampling.BILINEAR
        image = image.resize((new_w, new_h), resample)
    height, width = shape or (size, size)
    if new_h > height or new_w > width:
        raise ValueError(f"a {new_w}x{new_h} image does not fit a {width}x{height} input")
    dw, dh = (width - new_w) / 2, (height - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    out = np.full((height, width, 3), color, np.uint8)
    out[top : top + new_h, left : left + new_w] = np.asarray(image, np.uint8)
    return out, Letterbox(ratio=r, pad=(dw, dh), orig_hw=(h0, w0), shape=(height, width))


def rect_shape(aspects: Sequence[float], size: int, stride: int = 32, pad: float = 0.5) -> tuple[int, int]:
    """Upstream val.py's "rect" input (h, w) for a batch of images with these h/w aspect ratios:
    the long side stays ``size``, the short side shrinks to the widest image plus half a stride."""
    lo, hi = min(aspects), max(aspects)
    rel = (hi, 1.0) if hi < 1 else (1.0, 1 / lo) if lo > 1 else (1.0, 1.0)
    h, w = (math.ceil(v * size / stride + pad) * stride for v in rel)
    return h, w


def labels_to_letterbox(labels: np.ndarray, box: Letterbox) -> np.ndarray:
    """Original-image normalized (cls, cx, cy, w, h) to the letterboxed image's normalized frame."""
    h0, w0 = box.orig_hw
    height, width = box.shape
    out = labels.astype(np.float32, copy=True)
    sx, sy = w0 * box.ratio / width, h0 * box.ratio / height
    out[:, 1] = labels[:, 1] * sx + box.pad[0] / width
    out[:, 2] = labels[:, 2] * sy + box.pad[1] / height
    out[:, 3] = labels[:, 3] * sx
    out[:, 4] = labels[:, 4] * sy
    return out


def to_tensor(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB to float32 CHW in 0..1, the model's input convention (numpy, so an edge needs no
    torch; ``torch.from_numpy`` shares its memory)."""
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255.0)
    return chw


def decode_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB")


class YoloDataset:
    """Images and labels of one YOLO-format dataset (optionally a subset by index), letterboxed on load."""

    def __init__(self, root: str | Path, imgsz: int = 640, indices: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.imgsz = imgsz
        found = discover_images(self.root)
        if indices is not None:
            bad = [i for i in indices if not 0 <= i < len(found)]
            if bad:
                raise DatasetError(f"dataset {root}: indices {bad[:5]} outside 0..{len(found) - 1}")
            found = [found[i] for i in indices]
        self.paths = found
        self._labels: list[np.ndarray | None] = []
        self._sizes: list[tuple[int, int]] = []
        self._errors: dict[int, str] = {}
        for i, path in enumerate(found):
            self._labels.append(self._scan(i, path))

    def _scan(self, index: int, path: Path) -> np.ndarray | None:
        try:
            self._sizes.append(verify_image(path))
        except Exception as exc:  # decoders of damaged files raise all sorts; the sample is just skipped
            self._sizes.append((1, 1))
            self._errors[index] = f"{UNREADABLE_IMAGE}: {type(exc).__name__}: {exc}"
            return None
        try:
            return read_labels(img2label_path(path))
        except (DatasetError, OSError, UnicodeDecodeError) as exc:
            self._errors[index] = f"{BAD_LABELS}: {exc}"
            return None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> list[Skipped]:
        """Samples that cannot be used, with the reason (found at scan time or on a failed load)."""
        return [Skipped(i, str(self.paths[i]), r) for i, r in sorted(self._errors.items())]

    @property
    def usable(self) -> list[int]:
        return [i for i in range(len(self)) if i not in self._errors]

    def aspect(self, index: int) -> float:
        """Height / width of the upright image (1.0 for an unreadable one), without decoding it."""
        h, w = self._sizes[index]
        return h / w

    def source_labels(self, index: int) -> np.ndarray:
        labels = self._labels[index]
        return np.zeros((0, LABEL_COLUMNS), np.float32) if labels is None else labels

    def load(self, index: int, imgsz: int | None = None, shape: tuple[int, int] | None = None) -> YoloSample:
        """Letterboxed image and labels; on failure a sample with ``image`` None and ``error`` set."""
        path, labels = self.paths[index], self.source_labels(index)
        if index not in self._errors:
            try:
                pixels, box = letterbox(decode_image(path), imgsz or self.imgsz, shape)
                return YoloSample(index, path, to_tensor(pixels), labels_to_letterbox(labels, box), labels, box)
            except Exception as exc:  # as in _scan: a damaged file must not stop the run
                self._errors[index] = f"{UNREADABLE_IMAGE}: {type(exc).__name__}: {exc}"
        return YoloSample(index, path, None, labels, labels, None, self._errors[index])


def encode_labels(labels: np.ndarray) -> bytes:
    """Labels on the wire: little-endian float32 rows of (cls, cx, cy, w, h)."""
    return np.ascontiguousarray(labels, dtype="<f4").reshape(-1, LABEL_COLUMNS).tobytes()


def decode_labels(data: bytes) -> np.ndarray:
    row = 4 * LABEL_COLUMNS
    if len(data) % row:
        raise DatasetError(f"a YOLO label is a multiple of {row} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").reshape(-1, LABEL_COLUMNS).astype(np.float32)


class YoloEdgeDataset:
    """An edge's local detection data, as the edge agent reads it (see ``common.datasets.base``)."""

    def __init__(self, path: Path, image_size: int, indices: Sequence[int] | None = None) -> None:
        self.data = YoloDataset(path, image_size, indices)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> EdgeSample:
        s = self.data.load(index)
        key = _relative_key(s.path, self.data.root)
        return EdgeSample(id=index, key=key, image=s.image, label=encode_labels(s.labels), error=s.error)


def _relative_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root if root.is_dir() else root.parent).as_posix()
    except ValueError:
        return path.name
