"""The cloud's detection task (collate, loss, held-out mAP) and the trainer driving it from a spool."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloud_agent.spool import Spool, SpoolFeatures, StoredSample
from cloud_agent.tasks import Batch, make_task
from cloud_agent.tasks.detection import Detection, targets_of, translate
from cloud_agent.trainer import History, TrainConfig, Trainer, lr_factor, warmup_steps
from common.datasets.yolo import YoloEdgeDataset, encode_labels
from common.errors import DatasetError
from common.models.yolo import build_model
from common.privacy import BitEncoder, feature_transform
from common.protocol import FeatureBatch
from common.split import run_head, run_tail

BITS = feature_transform({})  # the reference encoding: x > 0, no randomization at evaluation

torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"
SIZE = 64
CUT = 4


def _folder(root: Path, count: int = 4) -> Path:
    """A tiny YOLO-layout folder: coloured rectangles with their boxes as labels."""
    rng = np.random.default_rng(0)
    for k in range(count):
        pixels = np.full((48, 64, 3), 114, np.uint8)
        x0, y0, w, h = 8 + 4 * k, 10, 20, 16
        pixels[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 255, 3)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / f"im{k}.jpg", quality=95)
        cx, cy = (x0 + w / 2) / 64, (y0 + h / 2) / 48
        (root / "labels" / f"im{k}.txt").write_text(f"{k % 2} {cx:.4f} {cy:.4f} {w / 64:.4f} {h / 48:.4f}\n")
    return root


def _samples(model: torch.nn.Module, folder: Path, node: str = "edge1") -> list[StoredSample]:
    """What the cloud's spool holds for these images: bits of the head outputs plus encoded labels."""
    data = YoloEdgeDataset(folder, SIZE)
    loaded = [data.load(i) for i in range(len(data))]
    x = torch.from_numpy(np.stack([s.image for s in loaded if s.image is not None]))
    with torch.no_grad():
        layout, packed = BitEncoder(100.0, seed=0).encode(run_head(model.eval(), x, CUT))
    return [StoredSample(node, s.id, s.label, 1, layout, p) for s, p in zip(loaded, packed, strict=True)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("yolov5n", num_classes=2)


def test_without_held_out_data_no_metric_is_reported(tmp_path: Path, model: torch.nn.Module) -> None:
    assert Detection(None, SIZE).evaluate(model, 4, lambda y: y > 0, "cpu") == {}
    with pytest.raises(DatasetError):
        Detection(tmp_path / "missing", SIZE)
    assert isinstance(make_task("yolov5n", _folder(tmp_path / "v"), SIZE), Detection)


def test_targets_carry_the_image_index() -> None:
    t = targets_of(
        [
            torch.tensor([[3.0, 0.5, 0.5, 0.2, 0.2]]),
            torch.zeros((0, 5)),
            torch.tensor([[1.0, 0.1, 0.2, 0.3, 0.4], [2.0, 0.5, 0.6, 0.7, 0.8]]),
        ]
    )
    assert t[:, 0].tolist() == [0, 2, 2] and t[:, 1].tolist() == [3, 1, 2]
    assert targets_of([]).shape == (0, 6)


def test_collate_decodes_bits_and_boxes(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = _folder(tmp_path / "data")
    samples = _samples(model, folder)
    task = Detection(folder, SIZE)
    batch = task.collate(samples)
    assert list(batch.features) == [3]  # cut 4: the tail reads only layer 3
    assert batch.features[3].shape == (4, 64, SIZE // 8, SIZE // 8)
    assert set(batch.features[3].unique().tolist()) <= {0.0, 1.0}
    assert batch.targets.shape == (4, 6)
    assert batch.targets[:, 0].tolist() == [0, 1, 2, 3] and batch.targets[:, 1].tolist() == [0, 1, 0, 1]
    # Labels are normalized to the square letterbox: a 64x48 image is padded 8 px top and bottom.
    assert batch.targets[0, 3].item() == pytest.approx((18 + 8) / 64, abs=1e-3)
    with torch.no_grad():
        model.train()
        output = run_tail(model, batch.features, CUT)
    loss, parts = task.loss(model, output, batch.targets)
    assert math.isfinite(float(loss)) and set(parts) == {"box", "obj", "cls"}


def test_evaluate_reports_finite_map_on_a_tiny_folder(tmp_path: Path, model: torch.nn.Module) -> None:
    task = Detection(_folder(tmp_path / "val"), SIZE)
    model.train()
    metrics = task.evaluate(model, CUT, BITS, "cpu")
    assert set(metrics) == {"map50", "map50_95"}
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in metrics.values())
    assert model.training  # the trainer's mode is restored


def test_evaluate_follows_the_split_path_with_pretrained_weights(tmp_path: Path) -> None:
    from common.checkpoint import load_model
    from scenarios.folders import link_yolo_folder

    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:6]
    task = Detection(link_yolo_folder(images, tmp_path / "val"), 320)
    pretrained, _ = load_model(WEIGHTS)
    real = task.evaluate(pretrained, CUT, lambda y: y, "cpu")  # no privacy: the plain model
    bits = task.evaluate(pretrained, CUT, BITS, "cpu")
    assert real["map50"] > 0.3
    assert bits["map50"] < real["map50"] / 2  # the pretrained tail does not understand bits


def test_warmup_and_cosine_schedule() -> None:
    assert warmup_steps(47, 3) == 47  # MNIST test job: one epoch
    assert warmup_steps(6, 30) == 18  # coco128 demo: three epochs of six steps
    assert warmup_steps(1000, 50) == 300  # never more than 300 steps
    assert warmup_steps(2, 2) == 1  # never more than a third of the job
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm, 0.01) for s in range(total)]
    assert factors[0] == pytest.approx(0.1, rel=0.01) and factors[9] == pytest.approx(1.0, abs=0.03)
    assert all(b <= a for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.01, abs=0.002)


def _spool(tmp_path: Path, samples: list[StoredSample]) -> Spool:
    spool = Spool(tmp_path / "spool.sqlite")
    layout = samples[0].layout
    batch = FeatureBatch(
        transfer=0,
        bits=1,
        layout=layout,
        ids=[s.id for s in samples],
        labels=[s.label for s in samples],
        data=b"".join(s.features for s in samples),
    )
    spool.commit_transfer("edge1", batch)
    return spool


def test_trainer_fits_detection_from_the_spool_and_resumes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data", count=4)
    torch.manual_seed(0)
    net = build_model("yolov5n", num_classes=2)
    spool = _spool(tmp_path, _samples(net, folder))
    task = Detection(folder, SIZE)
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=0.01, eval_interval=2)
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("model.0.")}
    trainer = Trainer(net, CUT, task, SpoolFeatures(spool, ["edge1"]), config, tmp_path / "state", BITS)
    seen: list[int] = []
    history = trainer.fit(History(), lambda r: seen.append(r.epoch))
    assert seen == [1, 2] and trainer.step == 4
    assert all(math.isfinite(v) for e in history.epochs for v in e.losses.values())
    assert set(history.epochs[1].metrics) == {"map50", "map50_95"} and not history.epochs[0].metrics
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in head_before.items())  # the head is frozen
    assert json.loads(history.to_json())[0]["epoch"] == 1
    # A new trainer on the same state directory has nothing left to do.
    again = Trainer(net, CUT, task, SpoolFeatures(spool, ["edge1"]), config, tmp_path / "state", BITS)
    assert again.fit(History.from_json(history.to_json()), lambda r: seen.append(r.epoch)).epochs[-1].epoch == 2
    assert seen == [1, 2] and again.step == 4
    # A longer job on the same state resumes after epoch 2, at the same schedule position.
    longer = TrainConfig(epochs=3, batch_size=2, learning_rate=0.01, eval_interval=5)
    more = Trainer(net, CUT, task, SpoolFeatures(spool, ["edge1"]), longer, tmp_path / "state", BITS)
    more.fit(History.from_json(history.to_json()), lambda r: seen.append(r.epoch))
    assert seen == [1, 2, 3] and more.step == 6
    spool.close()


def test_encode_labels_round_trip_through_collate(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = _folder(tmp_path / "data", count=2)
    samples = _samples(model, folder)
    empty = StoredSample(
        "edge1", 9, encode_labels(np.zeros((0, 5), np.float32)), 1, samples[0].layout, samples[0].features
    )
    batch = Detection(folder, SIZE).collate([samples[0], empty, samples[1]])
    assert batch.targets[:, 0].tolist() == [0, 2]


def test_translation_moves_features_and_boxes_together():
    """A hot cell and the box around it stay together whatever the move; a box moved off the square is dropped."""
    torch.manual_seed(0)
    size, cells = 320, 40
    features = torch.zeros(8, 3, cells, cells)
    features[:, :, 20, 20] = 1.0
    box = [(20.5 * 8) / size, (20.5 * 8) / size, 16 / size, 16 / size]
    corner = [0.5 * 8 / size, 0.5 * 8 / size, 8 / size, 8 / size]  # a cell-sized box in the top-left cell
    targets = torch.tensor([[b, 0.0, *box] for b in range(8)] + [[b, 0.0, *corner] for b in range(8)])
    moved = translate(Batch({3: features}, targets), 4, size)
    kept_corners = 0
    for b in range(8):
        y, x = divmod(int(moved.features[3][b, 0].argmax()), cells)
        rows = moved.targets[moved.targets[:, 0] == b]
        centered = rows[(rows[:, 4] - 16 / size).abs() < 1e-6]
        assert len(centered) == 1
        assert centered[0, 2].item() * size / 8 - 0.5 == pytest.approx(x, abs=1e-4)
        assert centered[0, 3].item() * size / 8 - 0.5 == pytest.approx(y, abs=1e-4)
        kept_corners += len(rows) - 1
        assert (rows[:, 2:4] - rows[:, 4:6] / 2 >= -1e-6).all() and (rows[:, 2:4] + rows[:, 4:6] / 2 <= 1 + 1e-6).all()
    assert 0 < kept_corners < 8  # moved left or up, the corner box leaves the square


def test_held_back_score_is_the_map_of_the_boxes_against_the_labels() -> None:
    """A tail that finds every labelled box scores mAP 1 on held-back samples; one that misplaces
    them scores less: the score that chooses the epoch is the task's own metric."""
    task = Detection(None, image_size=320)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.4], [1, 0, 0.25, 0.3, 0.1, 0.2]])  # image, cls, cx, cy, w, h

    def output(offset: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pred = torch.zeros(2, 3, 6)  # per image 3 candidates (cx, cy, w, h, objectness, class 0) in pixels
        for row in targets:
            cx, cy, w, h = (row[2:] * 320).tolist()
            pred[int(row[0]), 0] = torch.tensor([cx + offset * w, cy, w, h, 0.9, 1.0])
        return pred, []

    found = task.score([task.tally(output(0.0), targets)])
    misplaced = task.score([task.tally(output(0.3), targets)])
    assert found > 0.99 and 0.0 < misplaced < 0.8
