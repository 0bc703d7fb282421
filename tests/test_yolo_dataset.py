"""YOLO-format reading: layouts, missing labels, damaged files, subsets, letterbox geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets.yolo import (
    YoloDataset,
    YoloEdgeDataset,
    decode_labels,
    img2label_path,
    labels_to_letterbox,
    letterbox,
    read_labels,
    rect_shape,
)
from common.errors import DatasetError
from common.yolo_postprocess import scale_boxes, xywh2xyxy

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO128 = SHARED / "data" / "coco128"


def _image(path: Path, w: int = 64, h: int = 48, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)
    return path


def _label(image: Path, text: str) -> None:
    path = img2label_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
def test_coco128_layout() -> None:
    data = YoloDataset(COCO128)
    assert len(data) == 128 and not data.skipped
    assert [p.name for p in data.paths] == sorted(p.name for p in data.paths)
    assert sum(len(data.source_labels(i)) for i in range(len(data))) == 929
    first = data.paths[0]
    expected = np.loadtxt(COCO128 / "labels" / "train2017" / (first.stem + ".txt"), ndmin=2, dtype=np.float32)
    np.testing.assert_array_equal(data.source_labels(0), expected)
def test_sedna_layout_finds_the_nested_coco128(tmp_path: Path) -> None:
    root = tmp_path / "data" / "1" / "COCO"
    for sub in ("images", "labels"):
        (root / "coco128" / sub).mkdir(parents=True)
        shutil.copytree(COCO128 / sub / "train2017", root / "coco128" / sub / "train2017",
                        ignore=lambda _d, names: sorted(names)[3:])
    data = YoloDataset(root)
    assert [p.name for p in data.paths] == [p.name for p in YoloDataset(COCO128).paths[:3]]
    assert all(len(data.source_labels(i)) for i in range(3))
    assert img2label_path(data.paths[0]) == root / "coco128/labels/train2017" / (data.paths[0].stem + ".txt")


def test_image_without_label_file_has_no_boxes(tmp_path: Path) -> None:
    img = _image(tmp_path / "images" / "a.jpg")
    data = YoloDataset(tmp_path, 64)
    sample = data.load(0)
    assert sample.path == img and sample.image is not None and sample.error == ""
    assert sample.labels.shape == (0, 5) and sample.labels.dtype == np.float32


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a_good.jpg")
    _label(tmp_path / "images" / "a_good.jpg", "0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "images" / "b_garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 20)
    good = (tmp_path / "images" / "a_good.jpg").read_bytes()
    (tmp_path / "images" / "c_truncated.jpg").write_bytes(good[: len(good) // 3])
    _image(tmp_path / "images" / "d_bad_label.jpg")
    _label(tmp_path / "images" / "d_bad_label.jpg", "0 0.5 0.5 0.2\n")
    data = YoloDataset(tmp_path, 64)
    assert len(data) == 4
    results = [data.load(i) for i in range(len(data))]
    assert [s.image is not None for s in results] == [True, False, False, False]
    reasons = {Path(s.path).name: s.reason for s in data.skipped}
    assert set(reasons) == {"b_garbage.jpg", "c_truncated.jpg", "d_bad_label.jpg"}
    assert reasons["b_garbage.jpg"].startswith("unreadable image")
    assert reasons["d_bad_label.jpg"].startswith("bad label file") and "5 columns" not in reasons["b_garbage.jpg"]
    assert all(s.error for s in results[1:])
    assert data.usable == [0]


def test_subset_by_index(tmp_path: Path) -> None:
    for name in "cab":
        _image(tmp_path / "images" / f"{name}.png")
    assert [p.name for p in YoloDataset(tmp_path, indices=[2, 0]).paths] == ["c.png", "a.png"]
    with pytest.raises(DatasetError, match=r"outside 0\.\.2"):
        YoloDataset(tmp_path, indices=[3])


def test_unusable_roots_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        YoloDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="holds no images"):
        YoloDataset(tmp_path)


def test_labels_are_validated_and_polygons_become_boxes(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("1 0.5 0.5 0.2 0.4\n1 0.5 0.5 0.2 0.4\n\n2 0.1 0.1 0.3 0.1 0.3 0.5\n")
    np.testing.assert_allclose(read_labels(path), [[1, 0.5, 0.5, 0.2, 0.4], [2, 0.2, 0.3, 0.2, 0.4]], atol=1e-6)
    for bad in ("0 0.5 0.5 1.2 0.1", "-1 0.5 0.5 0.1 0.1", "0 a b c d", "0.5 0.5 0.5 0.1 0.1"):
        path.write_text(bad)
        with pytest.raises(DatasetError):
            read_labels(path)


def test_letterbox_matches_upstream_geometry() -> None:
    pixels, box = letterbox(Image.new("RGB", (640, 425), (1, 2, 3)), 640)
    assert pixels.shape == (640, 640, 3) and box.ratio == 1 and box.pad == (0, 107.5)
    assert (pixels[:107] == 114).all() and (pixels[107:532] == (1, 2, 3)).all() and (pixels[532:] == 114).all()
    pixels, box = letterbox(Image.new("RGB", (500, 375)), 320)
    assert pixels.shape == (320, 320, 3) and box.ratio == pytest.approx(0.64) and box.pad == (0, 40)
    pixels, box = letterbox(Image.new("RGB", (640, 480)), 640, shape=(512, 672))
    assert pixels.shape == (512, 672, 3) and box.pad == (16, 16)
    assert rect_shape([0.75], 640) == (512, 672) and rect_shape([0.7, 1.3], 320) == (352, 352)


def test_labels_map_into_the_letterbox_and_back() -> None:
    labels = np.array([[3, 0.25, 0.5, 0.1, 0.2], [0, 0.9, 0.1, 0.2, 0.2]], np.float32)
    _, box = letterbox(Image.new("RGB", (500, 300)), 320)
    moved = labels_to_letterbox(labels, box)
    pixels = xywh2xyxy(torch.from_numpy(moved[:, 1:]) * 320)
    back = scale_boxes(pixels, box.ratio, box.pad, box.orig_hw)
    original = xywh2xyxy(torch.from_numpy(labels[:, 1:]) * torch.tensor([500, 300, 500, 300]))
    torch.testing.assert_close(back, original, atol=1e-3, rtol=0)


def test_sample_tensor_is_rgb_in_unit_range(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.jpg", 64, 32, (255, 0, 0))
    sample = YoloDataset(tmp_path, 64).load(0)
    assert sample.image is not None and sample.image.shape == (3, 64, 64) and sample.image.dtype == np.float32
    assert sample.image.min() >= 0 and sample.image.max() <= 1
    assert sample.image[0, 32, 32] > 0.95 and sample.image[1, 32, 32] < 0.05  # red stays red (RGB order)
    assert sample.image[:, 0, 0].tolist() == pytest.approx([114 / 255] * 3)


def test_edge_dataset_ships_labels_as_bytes(tmp_path: Path) -> None:
    img = _image(tmp_path / "images" / "train" / "a.jpg", 64, 32)
    _label(img, "5 0.5 0.5 0.5 0.5\n")
    (tmp_path / "images" / "train" / "b.jpg").write_bytes(b"junk")
    edge = YoloEdgeDataset(tmp_path, 64)
    good, bad = edge.load(0), edge.load(1)
    assert good.id == 0 and good.key == "images/train/a.jpg" and good.image is not None
    np.testing.assert_allclose(decode_labels(good.label), [[5, 0.5, 0.5, 0.5, 0.25]])
    assert bad.image is None and "unreadable image" in bad.error
    with pytest.raises(DatasetError):
        decode_labels(b"123")
