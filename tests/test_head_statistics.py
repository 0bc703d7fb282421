"""The head's BatchNorm statistics re-estimated where it runs (``model.head_statistics: local``):
the mechanism, the edge that applies it, the assignment that asks for it and the evaluation that
replays it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cloud_agent.tasks.detection import Detection
from common.batchnorm import batchnorms, reestimate_head, spread
from common.checkpoint import load_model, save_checkpoint
from common.datasets.yolo import YoloDataset, YoloEdgeDataset, discover_images
from common.evaluation import split_predict_fn, with_local_head
from common.jobspec import HeadStatistics, ModelSpec
from common.privacy import BitEncoder, feature_transform
from common.protocol import JobAssignment
from common.split import layers_of, run_head
from edge_agent.torch_head import TorchExtractor
from scenarios.folders import link_yolo_folder

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"
CUT = 4
SIZE = 128


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    return load_model(WEIGHTS)[0].eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_yolo_folder(sorted(discover_images(COCO128))[:6], tmp_path_factory.mktemp("data") / "six")


def low_contrast(x: torch.Tensor) -> torch.Tensor:
    """A contrast shift (as COCO-C's ``contrast``): pixels pulled towards grey."""
    return 0.5 + (x - 0.5) * 0.25


def batches(folder: Path, shift: bool = False) -> list[torch.Tensor]:
    data = YoloDataset(folder, SIZE)
    x = torch.from_numpy(np.stack([data.load(i).image for i in data.usable]))
    return list((low_contrast(x) if shift else x).split(3))


def standardized_variance(model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Per-channel variance of the first BatchNorm's eval output in units of its scale: 1 when its
    statistics are the inputs' own."""
    conv = layers_of(model)[0]
    with torch.no_grad():
        z = torch.cat([conv.bn(conv.conv(x)) for x in inputs])
        scale = conv.bn.weight.abs().view(1, -1, 1, 1)
        return float(((z - conv.bn.bias.view(1, -1, 1, 1)) / scale).transpose(0, 1).flatten(1).var(1).mean())


def test_only_the_heads_statistics_change_and_they_are_the_images_own(pretrained: nn.Module, images: Path) -> None:
    model = copy.deepcopy(pretrained)
    shifted = batches(images, shift=True)
    momenta = [m.momentum for m in batchnorms(model, range(CUT))]
    assert standardized_variance(model, shifted) < 0.5  # the pretrained statistics do not fit the shift
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_head(model, CUT, shifted) == 6
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    head = tuple(f"model.{i}." for i in range(CUT))
    assert changed and all(k.startswith(head) and k.rsplit(".", 1)[1].startswith(("running_", "num_")) for k in changed)
    assert standardized_variance(model, shifted) == pytest.approx(1.0, abs=0.1)
    assert not model.training and [m.momentum for m in batchnorms(model, range(CUT))] == momenta
    assert reestimate_head(model, CUT, []) == 0  # nothing to learn from: the statistics stay
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model.state_dict().items())


def test_local_statistics_give_the_shifted_images_their_clean_features_back(
    pretrained: nn.Module, images: Path
) -> None:
    """What the option is for: a contrast shift moves what the pretrained head computes far from the
    clean images' features, and hardly at all once each side's head is normalized by its own images."""
    clean, shifted = batches(images), batches(images, shift=True)

    def cut(model: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([run_head(model, x, CUT)[CUT - 1] for x in inputs])

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    as_pretrained = distance(cut(pretrained, shifted), cut(pretrained, clean))
    local_clean, local_shifted = copy.deepcopy(pretrained), copy.deepcopy(pretrained)
    reestimate_head(local_clean, CUT, clean)
    reestimate_head(local_shifted, CUT, shifted)
    as_local = distance(cut(local_shifted, shifted), cut(local_clean, clean))
    assert as_local < as_pretrained / 2  # measured: 0.36 -> 0.16 of the clean features' norm


def test_spread_covers_the_whole_dataset() -> None:
    assert spread(range(10), 4) == [0, 3, 6, 9]
    assert spread([5, 7], 4) == [5, 7]
    assert spread(range(100), 1) == [0]


def test_the_edge_extracts_with_local_statistics_only_when_asked(pretrained: nn.Module, images: Path) -> None:
    def released(local: bool) -> bytes:
        encoder = BitEncoder(100.0, seed=1)
        extractor = TorchExtractor(copy.deepcopy(pretrained), CUT, encoder, YoloEdgeDataset(images, SIZE), 6,
                                   local_statistics=local)  # fmt: skip
        return extractor.extract(0).data

    assert released(False) == released(False)
    assert released(True) != released(False)


def test_the_job_asks_for_local_statistics_by_default_and_old_assignments_mean_pretrained() -> None:
    assert ModelSpec(arch="yolov5n").head_statistics == HeadStatistics.LOCAL
    old = {
        "job": "j", "node": "e1", "model": {"arch": "yolov5n", "num_classes": 80, "cut_layer": 4},
        "privacy": {"epsilon": 4.0}, "dataset": "d", "batch_size": 8,
        "head": {"sha256": "0" * 64, "size": 1, "chunks": 1},
    }  # fmt: skip
    assert JobAssignment.model_validate(old).model.head_statistics == HeadStatistics.PRETRAINED


def test_evaluation_replays_local_statistics_on_a_copy(pretrained: nn.Module, images: Path, tmp_path: Path) -> None:
    from mistnet.commands.eval import predict_fn_for

    model = copy.deepcopy(pretrained)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    transform = feature_transform({})
    features = lambda f: f  # noqa: E731 (real-valued: the pretrained tail scores these images)
    local = Detection(images, SIZE, local_head=True).evaluate(model, CUT, features, "cpu")
    plain = Detection(images, SIZE).evaluate(model, CUT, features, "cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the trained model is untouched
    assert local != plain
    meta = {"arch": "yolov5n", "num_classes": 80, "image_size": SIZE, "cut_layer": CUT, "head_statistics": "local"}
    save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), meta)
    loaded, weights = load_model(tmp_path / "m.safetensors")
    dataset = YoloDataset(images, SIZE)
    x = batches(images)[0]
    with torch.inference_mode():
        replayed = predict_fn_for(loaded, weights.metadata, dataset)(x)[0]
        expected = split_predict_fn(with_local_head(model, CUT, dataset), CUT, transform)(x)[0]
        as_pretrained = split_predict_fn(model, CUT, transform)(x)[0]
    assert torch.allclose(replayed, expected, atol=1e-4)
    assert not torch.allclose(replayed, as_pretrained, atol=1e-2)
