"""NMS, COCO scoring and the ``mistnet eval`` command; the slow test reproduces upstream's mAP."""

from __future__ import annotations

import json
import re
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import load_model, save_checkpoint
from common.datasets.yolo import YoloDataset
from common.evaluation import evaluate_detections, evaluate_model, model_predict_fn, split_predict_fn
from common.yolo_postprocess import non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"

torch.set_num_threads(2)


def _pred(rows: list[list[float]], nc: int = 3) -> torch.Tensor:
    """[1, N, 5+nc] from rows (cx, cy, w, h, obj, cls_prob_0, ...)."""
    return torch.tensor([[r + [0.0] * (5 + nc - len(r)) for r in rows]])


def test_nms_keeps_best_box_per_class() -> None:
    pred = _pred([
        [50, 50, 20, 20, 0.9, 0.9, 0.0, 0.0],
        [51, 50, 20, 20, 0.8, 0.9, 0.0, 0.0],  # overlaps the first, same class: suppressed
        [51, 50, 20, 20, 0.8, 0.0, 0.9, 0.0],  # same place, other class: kept
        [200, 200, 10, 10, 0.1, 0.1, 0.0, 0.0],  # below conf 0.25
    ])
    det = non_max_suppression(pred, 0.25, 0.45)[0]
    assert det[:, 5].tolist() == [0, 1]
    torch.testing.assert_close(det[0], torch.tensor([40, 40, 60, 60, 0.81, 0]))


def test_nms_multi_label_and_limits() -> None:
    pred = _pred([[50, 50, 20, 20, 1.0, 0.6, 0.5, 0.001]] + [[10.0 * k, 10, 4, 4, 0.5, 0.9] for k in range(1, 11)])
    multi = non_max_suppression(pred, 0.001, 0.6, multi_label=True)[0]
    assert sorted(multi[multi[:, 0] == 40][:, 5].tolist()) == [0, 1]
    single = non_max_suppression(pred, 0.001, 0.6, multi_label=False)[0]
    assert single[single[:, 0] == 40][:, 5].tolist() == [0]
    assert len(non_max_suppression(pred, 0.001, 0.6, max_det=4)[0]) == 4
    assert non_max_suppression(_pred([[1, 1, 1, 1, 0.0]]), 0.25, 0.45)[0].shape == (0, 6)
    assert len(non_max_suppression(pred, 0.001, 0.6, agnostic=True)[0]) == 11
    assert set(non_max_suppression(pred, 0.001, 0.6, multi_label=True, classes=[1])[0][:, 5].tolist()) == {1}


def test_box_conversions_round_trip() -> None:
    xywh = torch.tensor([[10.0, 20.0, 4.0, 6.0]])
    assert xywh2xyxy(xywh).tolist() == [[8, 17, 12, 23]]
    torch.testing.assert_close(xyxy2xywh(xywh2xyxy(xywh)), xywh)
    back = scale_boxes(torch.tensor([[0.0, 80.0, 640.0, 560.0]]), 1.0, (0.0, 80.0), (480, 640))
    assert back.tolist() == [[0, 0, 640, 480]]
    assert scale_boxes(torch.tensor([[-5.0, 0, 700, 10]]), 1.0, (0, 0), (480, 640)).tolist() == [[0, 0, 640, 10]]


def test_perfect_detections_score_one_and_none_score_zero() -> None:
    targets = [np.array([[0, 0.5, 0.5, 0.2, 0.2], [2, 0.2, 0.2, 0.1, 0.1]], np.float32), np.zeros((0, 5), np.float32)]
    sizes = [(100, 200), (50, 50)]
    exact = [torch.tensor([[80.0, 40, 120, 60, 0.9, 0], [30, 15, 50, 25, 0.8, 2]]), torch.zeros((0, 6))]
    assert evaluate_detections(exact, targets, sizes, 3) == pytest.approx({"map50": 1.0, "map50_95": 1.0})
    assert evaluate_detections([torch.zeros((0, 6))] * 2, targets, sizes, 3) == {"map50": 0.0, "map50_95": 0.0}
    shifted = [torch.tensor([[90.0, 40, 130, 60, 0.9, 0], [30, 15, 50, 25, 0.8, 1]]), torch.zeros((0, 6))]
    score = evaluate_detections(shifted, targets, sizes, 3)
    assert 0 < score["map50_95"] < score["map50"] < 1  # IoU 0.6 box counts at 0.5 only; wrong class never


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    if not WEIGHTS.is_file():
        pytest.fail("shared/weights is not beside the checkout")
    return load_model(WEIGHTS)[0].eval()


@pytest.fixture()
def small_data(tmp_path: Path) -> Path:
    """Four COCO128 images plus one damaged file, in the COCO128 layout."""
    if not COCO128.is_dir():
        pytest.fail("shared/data is not beside the checkout")
    for sub in ("images", "labels"):
        shutil.copytree(COCO128 / sub / "train2017", tmp_path / sub / "train2017",
                        ignore=lambda _d, names: sorted(names)[4:])
    (tmp_path / "images" / "train2017" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return tmp_path


def test_evaluate_model_reports_counts_progress_and_skips(model: torch.nn.Module, small_data: Path) -> None:
    seen: list[tuple[int, int]] = []
    data = YoloDataset(small_data)
    result = evaluate_model(model_predict_fn(model), data, 320, 2, progress=lambda d, t: seen.append((d, t)))
    assert result["images"] == 4 and result["boxes"] == sum(len(data.source_labels(i)) for i in range(4))
    assert result["imgsz"] == 320 and 0 < result["map50_95"] <= result["map50"] <= 1 and result["seconds"] > 0
    assert [Path(s["path"]).name for s in result["skipped"]] == ["zz_broken.jpg"]
    assert seen[-1] == (5, 5) and len(seen) == 3
    square = evaluate_model(model_predict_fn(model), data, 320, 2, rect=False)
    assert square["images"] == 4 and not square["rect"]


def test_split_path_with_identity_transform_scores_the_same(model: torch.nn.Module, small_data: Path) -> None:
    data = YoloDataset(small_data)
    plain = evaluate_model(model_predict_fn(model), data, 256, 4)
    split = evaluate_model(split_predict_fn(model, 4, lambda features: features), data, 256, 4)
    assert (split["map50"], split["map50_95"]) == pytest.approx((plain["map50"], plain["map50_95"]), abs=1e-6)


def _reference_table() -> dict[int, tuple[float, float]]:
    text = (SHARED / "reference" / "README.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", text, re.M)
    return {int(size): (float(m50), float(m5095)) for size, m50, m5095 in rows}


@pytest.mark.slow
def test_coco128_map_matches_upstream(model: torch.nn.Module) -> None:
    reference = _reference_table()
    data = YoloDataset(COCO128)
    for imgsz in (640, 320):
        start = time.perf_counter()
        result = evaluate_model(model_predict_fn(model), data, imgsz, 16)
        print(f"coco128 @{imgsz}: mAP50 {result['map50']:.4f} (ref {reference[imgsz][0]}), "
              f"mAP50-95 {result['map50_95']:.4f} (ref {reference[imgsz][1]}), {time.perf_counter() - start:.1f} s")
        assert (result["images"], result["boxes"]) == (128, 929)
        assert result["map50"] == pytest.approx(reference[imgsz][0], abs=0.02)
        assert result["map50_95"] == pytest.approx(reference[imgsz][1], abs=0.02)


# -- the command ------------------------------------------------------------------------------------


def _args(model: Path, data: Path, **kw: object) -> Namespace:
    return Namespace(model=model, data=data, imgsz=kw.get("imgsz", 256), batch_size=4, square=False,
                     device="cpu", json=kw.get("json", True))
def test_eval_command_prints_one_json_object(small_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mistnet.commands.eval import run

    assert run(_args(WEIGHTS, small_data)) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"images", "boxes", "map50", "map50_95", "imgsz", "model", "seconds"}
    assert out["images"] == 4 and out["imgsz"] == 256 and out["model"] == str(WEIGHTS)
    assert run(_args(WEIGHTS, small_data, json=False)) == 0
    assert "mAP@0.5:0.95" in capsys.readouterr().out
def test_eval_command_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mistnet import cli

    monkeypatch.setattr(cli, "COMMANDS", ["eval"])
    assert cli.main(["eval", "--model", str(tmp_path / "none.pt"), "--data", str(COCO128)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mistnet eval: error: model file {tmp_path / 'none.pt'} does not exist"]
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(WEIGHTS), "--data", str(COCO128), "--imgsz", "300"])
def test_mistnet_checkpoint_is_evaluated_through_its_bits(model: torch.nn.Module, small_data: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Metadata with cut_layer makes `mistnet eval` run head -> bits -> tail, not the plain model."""
    from common.datasets.yolo import YoloDataset
    from common.evaluation import evaluate_model, model_predict_fn, split_predict_fn
    from common.privacy import feature_transform
    from mistnet.commands.eval import run

    path = tmp_path / "mistnet.safetensors"
    meta = {"arch": "yolov5n", "num_classes": 80, "image_size": 224, "cut_layer": 4, "epsilon": 4.0}
    save_checkpoint(path, model.state_dict(), meta)
    assert run(_args(path, small_data, imgsz=None)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["imgsz"] == 224  # the size the checkpoint was trained at
    data = YoloDataset(small_data, 224)
    via_bits = evaluate_model(split_predict_fn(model, 4, feature_transform(meta)), data, 224)
    plain = evaluate_model(model_predict_fn(model), data, 224)
    assert out["map50_95"] == pytest.approx(via_bits["map50_95"], abs=1e-9)
    assert plain["map50_95"] > via_bits["map50_95"]
