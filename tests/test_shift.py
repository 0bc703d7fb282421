"""`mistnet data shift`: a COCO-C corrupted copy of a YOLO dataset, deterministic, labels untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datasets.shift import Shift, seed_of, shift_dataset
from common.datasets.yolo import discover_images, img2label_path
from common.errors import DatasetError

PERSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-person"


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Three coco-person images with their labels, in the YOLO layout."""
    root = tmp_path / "src"
    for image in discover_images(PERSON)[:3]:
        rel = image.relative_to(PERSON)
        for src, dst in ((image, root / rel), (img2label_path(image), img2label_path(root / rel))):
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    (root / "names.yaml").write_text((PERSON / "names.yaml").read_text())
    return root


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_shift_is_deterministic_keeps_labels_and_changes_pixels(small: Path, tmp_path: Path) -> None:
    shift = Shift("contrast", 5)
    first = shift_dataset(small, tmp_path / "a", shift)
    second = shift_dataset(small, tmp_path / "b", shift)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    for source, shifted in zip(discover_images(small), first, strict=True):
        assert img2label_path(shifted).read_bytes() == img2label_path(source).read_bytes()
        before, after = pixels(source), pixels(shifted)
        assert before.shape == after.shape
        # contrast 5 pulls every pixel towards the mean: the spread collapses.
        assert after.std() < 0.3 * before.std()
    assert (tmp_path / "a" / "names.yaml").read_text() == (small / "names.yaml").read_text()


def test_noise_depends_on_the_file_name_not_the_order(small: Path, tmp_path: Path) -> None:
    shift = Shift("gaussian_noise", 3)
    whole = shift_dataset(small, tmp_path / "all", shift)
    last = discover_images(small)[-1]
    alone = tmp_path / "alone-src" / "images" / last.name
    alone.parent.mkdir(parents=True)
    alone.symlink_to(last.resolve())
    (only,) = shift_dataset(tmp_path / "alone-src", tmp_path / "alone", shift)
    assert only.read_bytes() == whole[-1].read_bytes()
    assert seed_of("a.jpg") != seed_of("b.jpg")


@pytest.mark.parametrize(
    ("text", "message"),
    [("contrast", "NAME:SEVERITY"), ("haze:3", "unknown corruption 'haze'"), ("fog:6", "severity must be 1..5")],
)
def test_bad_shift_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        Shift.parse(text)


def test_refuses_to_overwrite(small: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        shift_dataset(small, tmp_path / "full", Shift("fog", 3))
    with pytest.raises(DatasetError, match="outside its source"):
        shift_dataset(small, small / "shifted", Shift("fog", 3))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli(small: Path, tmp_path: Path) -> None:
    def mistnet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mistnet.cli", "data", "shift", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    done = mistnet(str(small), str(tmp_path / "out"), "--corruption", "fog", "--severity", "3")
    assert done.returncode == 0, done.stderr
    assert "3 images under fog:3" in done.stdout
    assert len(discover_images(tmp_path / "out")) == 3
    bad = mistnet(str(small), str(tmp_path / "out2"), "--corruption", "fog", "--severity", "9")
    assert bad.returncode == 2 and "--severity" in bad.stderr and "Traceback" not in bad.stderr
