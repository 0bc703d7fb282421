"""The YOLOv5 loss: target assignment, finite values, perfect vs random predictions, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from cloud_agent.yolo_loss import LossGains, YoloLoss, detect_layer
from common.models.yolo import build_model

torch.set_num_threads(2)

IMG = 128  # grids 16, 8, 4


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("yolov5n", num_classes=3)


def _maps(batch: int, nc: int = 3, fill: float | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = []
    for s in (8, 16, 32):
        shape = (batch, 3, IMG // s, IMG // s, 5 + nc)
        maps.append(torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=g))
    return maps


def _targets(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(-1, 6)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p / (1 - p))


def test_detect_layer_is_required() -> None:
    with pytest.raises(TypeError, match="Detect"):
        detect_layer(torch.nn.Linear(2, 2))


def test_gains_scale_like_upstream_train() -> None:
    g = LossGains().scaled(levels=3, classes=80, image_size=640)
    assert (g.box, g.obj, g.cls) == (0.05, 1.0, 0.5)
    g = LossGains().scaled(levels=3, classes=8, image_size=320)
    assert g.box == 0.05 and math.isclose(g.cls, 0.05) and math.isclose(g.obj, 0.25)


def test_assignment_uses_matching_anchors_and_neighbour_cells(model: torch.nn.Module) -> None:
    loss = YoloLoss(model)
    # Level 0 grid is 16x16 (stride 8). Box 13x16 px ≈ anchor (10, 13) → ratio < 4 for all three P3
    # anchors (10x13, 16x30, 33x23); centre at cell (5.3, 7.7): own cell, left (x frac < .5) and
    # below (y frac > .5) → 3 cells per anchor.
    cx, cy = 5.3 / 16, 7.7 / 16
    t = _targets([[0, 2, cx, cy, 13 / IMG, 16 / IMG]])
    levels = loss.build_targets(_maps(1), t)
    p3 = levels[0]
    assert len(p3) == 9
    cells = {(int(x), int(y)) for x, y in zip(p3.gx, p3.gy, strict=True)}
    assert cells == {(5, 7), (4, 7), (5, 8)}
    assert set(p3.anchor.tolist()) == {0, 1, 2}
    assert set(p3.cls.tolist()) == {2} and set(p3.image.tolist()) == {0}
    # Box centres relative to their cell stay inside the reachable range (-0.5, 1.5).
    assert bool(((p3.box[:, :2] > -0.5) & (p3.box[:, :2] < 1.5)).all())
    # P5's smallest anchor is 116x90 px: a 13x16 box is more than 4x smaller, so no match there.
    assert len(levels[2]) == 0


def test_edge_cells_have_no_outside_neighbours(model: torch.nn.Module) -> None:
    t = _targets([[0, 0, 0.2 / 16, 0.2 / 16, 12 / IMG, 12 / IMG]])  # in the corner cell, low fractions
    p3 = YoloLoss(model).build_targets(_maps(1), t)[0]
    assert {(int(x), int(y)) for x, y in zip(p3.gx, p3.gy, strict=True)} == {(0, 0)}


def test_finite_loss_and_parts(model: torch.nn.Module) -> None:
    t = _targets([[0, 1, 0.5, 0.5, 0.3, 0.4], [0, 0, 0.2, 0.3, 0.05, 0.08], [1, 2, 0.7, 0.6, 0.9, 0.8]])
    loss, parts = YoloLoss(model)(_maps(2), t)
    assert torch.isfinite(loss) and loss.dim() == 0
    assert set(parts) == {"box", "obj", "cls"} and all(v > 0 for v in parts.values())
    assert math.isclose(float(loss), 2 * sum(parts.values()), rel_tol=1e-5)  # per-image parts x batch
    empty, parts = YoloLoss(model)(_maps(2), t[:0])
    assert torch.isfinite(empty) and parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0


def test_unknown_classes_are_ignored_not_fatal(model: torch.nn.Module) -> None:
    maps = _maps(1)
    good = _targets([[0, 1, 0.5, 0.5, 0.3, 0.4]])
    with_bad = torch.cat((good, _targets([[0, 7, 0.2, 0.2, 0.1, 0.1]])))
    assert float(YoloLoss(model)(maps, with_bad)[0]) == pytest.approx(float(YoloLoss(model)(maps, good)[0]))


def test_rejects_malformed_input(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="levels"):
        YoloLoss(model)(_maps(1)[:2], _targets([]))
    with pytest.raises(ValueError, match="targets"):
        YoloLoss(model)(_maps(1), torch.zeros(3, 5))


def test_perfect_prediction_scores_far_below_random(model: torch.nn.Module) -> None:
    loss = YoloLoss(model)
    t = _targets([[0, 1, 0.25, 0.3, 0.1, 0.12], [0, 2, 0.75, 0.7, 0.5, 0.4], [1, 0, 0.5, 0.5, 0.3, 0.3]])
    maps = _maps(2, fill=0.0)
    for m in maps:
        m[..., 4] = -12.0  # nothing anywhere...
        m[..., 5:] = -12.0
    for level, assigned in enumerate(loss.build_targets(maps, t)):
        idx = (assigned.image, assigned.anchor, assigned.gy, assigned.gx)
        xy = _logit((assigned.box[:, :2] + 0.5) / 2)
        wh = _logit(torch.sqrt(assigned.box[:, 2:] / assigned.anchor_wh) / 2)
        maps[level][(*idx, slice(0, 2))] = xy
        maps[level][(*idx, slice(2, 4))] = wh
        maps[level][(*idx, 4)] = 12.0  # ...except exactly where the targets are
        cls = torch.full((len(assigned), 3), -12.0)
        cls[torch.arange(len(assigned)), assigned.cls] = 12.0
        maps[level][(*idx, slice(5, 8))] = cls
    perfect, parts = loss(maps, t)
    random, _ = loss(_maps(2), t)
    assert parts["box"] < 1e-4 and parts["cls"] < 1e-4 and parts["obj"] < 1e-3
    assert float(perfect) < 0.01 * float(random)


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model("yolov5n", num_classes=3).train()
    x = torch.rand(2, 3, IMG, IMG)
    t = _targets([[0, 1, 0.3, 0.4, 0.2, 0.3], [1, 2, 0.6, 0.5, 0.5, 0.4], [1, 0, 0.2, 0.8, 0.1, 0.1]])
    loss_fn = YoloLoss(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, _ = loss_fn(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.85 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
