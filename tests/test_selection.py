"""The epoch that ships is chosen on received samples held back from training, epoch 0 included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cloud_agent.tasks import Batch
from cloud_agent.trainer import EpochResult, History, Selection, TrainConfig, Trainer, selection_split, shipped_weights
from common import constants as C
from common.jobspec import JobSpec, parse_job_text
from common.models.lenet import LeNet5
from common.split import run_head

CUT = 2


class Digits:
    """A stand-in task over ``(features, label)`` pairs: the trainer's contract, nothing else."""

    headline = "accuracy"

    def collate(self, samples: list[tuple[torch.Tensor, int]]) -> Batch:
        return Batch({CUT - 1: torch.stack([s[0] for s in samples])}, torch.tensor([s[1] for s in samples]))

    def augment(self, batch: Batch) -> Batch:
        return batch

    def loss(self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = F.cross_entropy(output, targets)
        return loss, {"ce": float(loss.detach())}

    def evaluate(self, model: nn.Module, cut: int, privatize, device: str) -> dict[str, float]:
        return {}

    def tally(self, output: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((output.argmax(1) == targets).sum()), len(targets)

    def score(self, tallies: list[tuple[int, int]]) -> float:
        return sum(c for c, _ in tallies) / sum(n for _, n in tallies)


class WorseWhenLearning(Digits):
    """A task whose metric falls as accuracy rises: what ships must follow the metric, not the loss."""

    def score(self, tallies: list[tuple[int, int]]) -> float:
        return -super().score(tallies)


def samples(model: nn.Module, n: int = 200) -> list[tuple[torch.Tensor, int]]:
    """Features of a learnable toy problem: the label is which quadrant holds the bright square."""
    torch.manual_seed(0)
    images, labels = torch.zeros(n, 1, 28, 28), torch.randint(0, 4, (n,))
    for image, label in zip(images, labels, strict=True):
        r, c = divmod(int(label), 2)
        image[0, r * 14 : r * 14 + 10, c * 14 : c * 14 + 10] = 1.0
    with torch.no_grad():
        feats = run_head(model.eval(), images + 0.1 * torch.randn_like(images), CUT)[CUT - 1]
    return [(f, int(y)) for f, y in zip(feats, labels, strict=True)]


def train(
    tmp_path: Path, learning_rate: float, task: Digits | None = None
) -> tuple[Trainer, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    model = LeNet5(num_classes=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data, selection = selection_split(samples(model), 0.2, seed=0)
    assert selection is not None and len(selection) == 40 and len(data) == 160
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=learning_rate, recalibrate_bn=False, grad_clip=0)
    trainer = Trainer(model, CUT, task or Digits(), data, config, tmp_path / "state", lambda f: f, selection)
    trainer.fit(History(), lambda _: None)
    return trainer, model, start


def test_a_diverging_job_ships_the_model_it_started_from(tmp_path: Path) -> None:
    trainer, model, start = train(tmp_path, learning_rate=500.0)
    chosen = trainer.restore_selected()
    assert chosen is not None and chosen.epoch == 0 and chosen.loss == chosen.before
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert shipped_weights(tmp_path / "state") == tmp_path / "state" / "best.safetensors"


def test_a_learning_job_ships_its_best_epoch(tmp_path: Path) -> None:
    trainer, model, start = train(tmp_path, learning_rate=0.05)
    chosen = trainer.restore_selected()
    assert chosen is not None and chosen.epoch >= 1 and chosen.loss < 0.5 * chosen.before
    assert chosen.score is not None and chosen.score_before is not None and chosen.score > chosen.score_before
    assert not all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_the_task_metric_chooses_even_when_the_loss_disagrees(tmp_path: Path) -> None:
    trainer, model, start = train(tmp_path, learning_rate=0.05, task=WorseWhenLearning())
    last_epoch_loss = trainer.selection_scores()[0]
    chosen = trainer.restore_selected()
    assert chosen is not None and chosen.epoch == 0
    assert last_epoch_loss < 0.5 * chosen.loss  # the trained tail had by far the lower loss, and lost
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_too_few_samples_are_not_split() -> None:
    data = list(range(19))
    assert selection_split(data, 0.1, 0) == (data, None)
    assert selection_split(list(range(100)), 0.0, 0)[1] is None
    train, held = selection_split(list(range(100)), 0.1, 0)
    assert held is not None and len(held) == 10 and sorted([*train, *held]) == list(range(100))


def test_a_shipped_epoch_below_the_start_on_held_out_data_is_said() -> None:
    from cloud_agent.training import held_out_regression

    said = held_out_regression("map50_95", 6, {"map50_95": 0.145}, {"map50_95": 0.073, "map50": 0.18})
    assert said is not None and "epoch 6" in said and "0.0730" in said and "0.1450" in said
    assert held_out_regression("map50_95", 6, {"map50_95": 0.145}, {"map50_95": 0.187}) is None
    assert held_out_regression("map50_95", 0, {}, {}) is None  # no held-out data: nothing to compare


def _job(epsilons: str, extra: str = "", pretrained: str = "  pretrained: /weights/yolov5n.pt\n") -> JobSpec:
    model = f"model:\n  arch: yolov5n\n{pretrained}"
    text = f"name: j\n{model}cut_layer: 4\nprivacy: {{epsilon: 100}}\nedges:\n{epsilons}{extra}"
    return parse_job_text(text, "job.yaml").spec


def test_a_trained_epoch_chosen_on_strongly_randomized_samples_is_said_when_nothing_checked_it() -> None:
    from cloud_agent.training import unchecked_choice

    small = "  - {node: e1, dataset: /d/1}\n  - {node: e2, dataset: /d/2, epsilon: 2}\n"
    said = unchecked_choice(_job(small), 5)
    assert said is not None and "epoch 5" in said and "epsilon 2" in said and "cloud.validation" in said
    assert unchecked_choice(_job(small), 0) is None  # the start ships: nothing to check
    assert unchecked_choice(_job(small, "cloud: {validation: /d/val}\n"), 5) is None  # held_out_regression's part
    assert unchecked_choice(_job(small, pretrained=""), 5) is None  # a model from scratch has no start to keep
    at_the_bar = f"  - {{node: e1, dataset: /d/1, epsilon: {C.SELECTION_MIN_EPSILON}}}\n"
    assert unchecked_choice(_job(at_the_bar), 5) is None


class _Headline:
    headline = "accuracy"


@pytest.mark.parametrize("veto", [True, False])
def test_an_epoch_below_the_start_on_held_out_data_is_vetoed_unless_the_job_says_not_to(
    tmp_path: Path, veto: bool
) -> None:
    from cloud_agent.job import Job
    from cloud_agent.trainer import save_weights
    from cloud_agent.training import Training, start_weights

    text = f"name: j\nmodel: {{arch: lenet5}}\ncut_layer: 2\ncloud: {{held_out_veto: {str(veto).lower()}}}\n"
    job = Job.open(parse_job_text(text + "edges: [{node: e1, dataset: /d}]\n", "job.yaml").spec, tmp_path, "cpu", None)
    job.spool.set_meta("metrics_before", json.dumps({"accuracy": 0.9}))
    save_weights(job.model, start_weights(job))
    start = {k: v.clone() for k, v in job.model.state_dict().items()}
    with torch.no_grad():
        for p in job.model.parameters():
            p.add_(1.0)  # epoch 3's weights
    best = tmp_path / "state" / "best.safetensors"
    save_weights(job.model, best)
    training = Training(job, None, lambda _: None)  # type: ignore[arg-type]
    training.history = History([EpochResult(3, {}, {"accuracy": 0.5}, 1.0, 1.0)])
    training.record_selection(Selection(3, 0.1, 0.2, 0.95, 0.9), _Headline())  # type: ignore[arg-type]
    selection, message = json.loads(job.spool.get_meta("selection") or ""), job.spool.get_meta("message") or ""
    assert "epoch 3" in message and "0.5000" in message and "0.9000" in message
    shipped = load_file(str(best))
    if veto:
        assert selection["epoch"] == 0 and selection["metrics"] == {"accuracy": 0.9} and "held_out_veto" in message
        assert all(torch.equal(shipped[k], v) and torch.equal(job.model.state_dict()[k], v) for k, v in start.items())
    else:
        assert selection["epoch"] == 3 and selection["metrics"] == {"accuracy": 0.5} and "larger epsilon" in message
        now = job.model.state_dict()
        assert all(torch.equal(shipped[k], now[k]) for k in start) and not torch.equal(now["model.0.0.weight"],
                                                                                 start["model.0.0.weight"])
    job.spool.close()
