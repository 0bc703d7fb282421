"""Our YOLOv5 against the official checkpoint and the figures upstream measured (shared/reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_model, read_tensors
from common.datasets.yolo import YoloDataset
from common.errors import SpecError
from common.models.archs import default_image_size
from common.models.yolo import SIZES, Detect, build_model
from common.split import layers_of, run_head, run_tail, tail_inputs
from common.yolo_postprocess import non_max_suppression, scale_boxes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"
REFERENCE = SHARED / "reference" / "yolov5n_layers.json"


torch.set_num_threads(2)


@pytest.fixture(scope="module")
def official() -> torch.nn.Module:
    model, _ = load_model(WEIGHTS)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_state_dict_names_and_shapes_equal_the_official_file() -> None:
    theirs, _ = read_tensors(WEIGHTS)
    ours = build_model("yolov5n", 80).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_parameter_count_is_upstreams() -> None:
    model = build_model("yolov5n", 80)
    params = sum(p.numel() for p in model.parameters())
    assert params == 1_872_157
    # Upstream prints its summary after fusing each BatchNorm into its conv (2 per channel become 1).
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert params - bn_channels == 1_867_405


@pytest.mark.parametrize(("arch", "params"), [
    ("yolov5s", 7_235_389), ("yolov5m", 21_190_557), ("yolov5l", 46_563_709), ("yolov5x", 86_749_405)])
def test_every_size_has_upstreams_parameter_count(arch: str, params: int) -> None:
    with torch.device("meta"):
        model = build_model(arch, 80)
    assert sum(p.numel() for p in model.parameters()) == params


def test_layers_carry_upstream_routing() -> None:
    model = build_model("yolov5n", 80)
    assert len(model.model) == 25
    assert [m.i for m in model.model] == list(range(25))
    assert model.model[12].f == [-1, 6] and model.model[24].f == [17, 20, 23] and model.model[3].f == -1
    assert model.save == [4, 6, 10, 14, 17, 20, 23]
    assert tail_inputs(model, 4) == [3]  # MistNet's usual cut: the edge sends layer 3 only
    assert default_image_size("yolov5n") == 640 and set(SIZES) == {f"yolov5{s}" for s in "nsmlx"}


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(SpecError, match="yolov5q"):
        build_model("yolov5q", 80)


def test_train_mode_returns_raw_maps_and_eval_mode_decodes() -> None:
    model = build_model("yolov5n", 3)
    x = torch.rand(2, 3, 128, 96)
    raw = model.train()(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 16, 12, 8), (2, 3, 8, 6, 8), (2, 3, 4, 3, 8)]
    with torch.no_grad():
        pred, raw = model.eval()(x)
    assert pred.shape == (2, 3 * (16 * 12 + 8 * 6 + 4 * 3), 8) and len(raw) == 3
    assert isinstance(model.model[24], Detect) and model.model[24].anchors.shape == (3, 3, 2)


def test_forward_equals_head_then_tail(official: torch.nn.Module) -> None:
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        whole = official(x)[0]
        split = run_tail(official, run_head(official, x, 4), 4)[0]
    torch.testing.assert_close(whole, split)


def _layer_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    outputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: outputs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, m in enumerate(layers_of(model))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@pytest.mark.parametrize("image", [0, 1])
def test_every_layer_matches_the_reference(official: torch.nn.Module, reference: dict, image: int) -> None:
    ref = reference["images"][image]
    data = YoloDataset(COCO128, 640)
    sample = data.load([p.name for p in data.paths].index(Path(ref["file"]).name))
    assert sample.image is not None and sample.letterbox is not None
    assert list(sample.letterbox.orig_hw) == ref["orig_hw"]
    outputs = _layer_outputs(official, torch.from_numpy(sample.image)[None])
    for layer in ref["layers"]:
        out = outputs[layer["i"]]
        assert list(out.shape) == layer["shape"], layer
        for stat, value in (("mean", out.mean().item()), ("abs_mean", out.abs().mean().item())):
            assert value == pytest.approx(layer[stat], rel=1e-3, abs=1e-5), (layer["i"], stat)


@pytest.mark.parametrize("image", [0, 1])
def test_detections_match_the_reference(official: torch.nn.Module, reference: dict, image: int) -> None:
    ref = reference["images"][image]
    expected = torch.tensor(ref["detections_conf0.25_iou0.45_xyxy_original_pixels"])
    data = YoloDataset(COCO128, 640)
    sample = data.load([p.name for p in data.paths].index(Path(ref["file"]).name))
    assert sample.image is not None and sample.letterbox is not None
    with torch.no_grad():
        pred = official(torch.from_numpy(sample.image)[None])[0]
    det = non_max_suppression(pred, 0.25, 0.45, max_det=1000)[0]
    box = sample.letterbox
    det[:, :4] = scale_boxes(det[:, :4], box.ratio, box.pad, box.orig_hw)
    assert det.shape == expected.shape
    assert det[:, 5].tolist() == expected[:, 5].tolist()
    assert (det[:, :4] - expected[:, :4]).abs().max() <= 1.0  # the reference rounds to whole pixels
    assert (det[:, 4] - expected[:, 4]).abs().max() <= 2e-3
