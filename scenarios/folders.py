"""Per-role dataset folders of a detection scenario: a seeded split of the images, linked (not copied)
into YOLO-layout folders, optionally under a COCO-C shift."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from common.datasets.shift import Shift, shift_images, shifted_path
from common.datasets.yolo import img2label_path
from common.errors import DatasetError, SpecError


@dataclass(frozen=True)
class ImageSplit:
    edges: list[list[Path]]
    held_out: list[Path]
    public: list[Path]


def split_images(
    images: list[Path], edges: int, per_edge: int | None, held_out: int, seed: int = 0, public: int = 0
) -> ImageSplit:
    """A seeded shuffle of the (sorted) images: ``held_out`` for the cloud's evaluation, then ``public``
    unlabelled images for its adaptation, then ``per_edge`` per edge (default: the rest, shared
    equally). Disjoint; the same inputs always give the same split."""
    if edges < 1 or held_out < 1:
        raise SpecError(f"need at least one edge and one held-out image, got {edges} and {held_out}")
    order = sorted(images, key=lambda p: p.as_posix())
    random.Random(seed).shuffle(order)
    per = (len(order) - held_out - public) // edges if per_edge is None else per_edge
    if per < 1 or held_out + public + edges * per > len(order):
        raise DatasetError(
            f"{len(order)} images cannot give {held_out} held-out, {public} public images and "
            f"{edges} edge(s) x {per if per > 0 else 'at least 1'} images"
        )
    rest = order[held_out + public :]
    return ImageSplit(
        [rest[k * per : (k + 1) * per] for k in range(edges)], order[:held_out], order[held_out : held_out + public]
    )


def link_yolo_folder(images: list[Path], dest: Path, labels: bool = True) -> Path:
    """``dest/images/*`` and (``labels``) ``dest/labels/*.txt`` as symlinks to the originals (YOLO layout)."""
    if dest.exists():
        shutil.rmtree(dest)  # only symlinks of an earlier run: the originals are untouched
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for image in images:
        link = dest / "images" / image.name
        if link.exists():
            raise DatasetError(f"two images named {image.name}: cannot link both into {dest}")
        link.symlink_to(image.resolve())
        label = img2label_path(image)
        if labels and label.is_file():
            (dest / "labels" / label.name).symlink_to(label.resolve())
    return dest


def shifted_split(split: ImageSplit, data: Path, shift: Shift, dest: Path) -> ImageSplit:
    """The split's labelled images (edges, held-out) under ``shift`` in ``dest``, written once per
    work directory (a marker says the copy is whole); the cloud's public images stay as they are."""
    root = data if data.is_dir() else data.parent
    edges = [[shifted_path(p, root, dest) for p in part] for part in split.edges]
    held_out = [shifted_path(p, root, dest) for p in split.held_out]
    done = dest / ".complete"
    if not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        console = Console(stderr=True)
        console.print(f"shifting the labelled images to {shift} in {dest}")

        def progress(n: int, total: int) -> None:
            if n % 100 == 0 or n == total:
                console.print(f"  {n}/{total} images")

        shift_images([p for part in [*split.edges, split.held_out] for p in part], root, dest, shift, progress)
        done.touch()
    return ImageSplit(edges, held_out, split.public)
