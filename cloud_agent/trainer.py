"""Trains the tail on spooled features, one checkpoint per completed epoch so a crash resumes."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.split import layers_of, run_tail
from common.storage import write_atomic
from cloud_agent.spool import Spool, StoredSample
from cloud_agent.tasks import CloudTask, Privatize

log = logging.getLogger("mistnet.cloud.trainer")


class SpoolFeatures(Dataset[StoredSample]):
    """Reads samples from disk on demand: memory does not grow with the data."""

    def __init__(self, spool: Spool, nodes: list[str]) -> None:
        self.spool = spool
        self.rowids = spool.rowids(nodes)

    def __len__(self) -> int:
        return len(self.rowids)

    def __getitem__(self, index: int) -> StoredSample:
        return self.spool.read(self.rowids[index])


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    eval_interval: int = 1
    device: str = "cpu"
    seed: int = 0


@dataclass
class EpochResult:
    epoch: int
    losses: dict[str, float]
    metrics: dict[str, float]
    seconds: float
    images_per_s: float


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps([e.__dict__ for e in self.epochs])

    @classmethod
    def from_json(cls, text: str | None) -> History:
        return cls([EpochResult(**e) for e in json.loads(text)] if text else [])


def freeze_head(model: nn.Module, cut: int) -> list[nn.Parameter]:
    """Head frozen; returns the tail's parameters, the only ones the optimizer sees."""
    tail = []
    for i, layer in enumerate(layers_of(model)):
        for p in layer.parameters():
            p.requires_grad_(i >= cut)
            if i >= cut:
                tail.append(p)
    return tail


class Trainer:
    def __init__(self, model: nn.Module, cut: int, task: CloudTask, data: Dataset[StoredSample],
                 config: TrainConfig, state_dir: Path, privatize: Privatize) -> None:
        self.model = model.to(config.device)
        self.cut = cut
        self.task = task
        self.data = data
        self.config = config
        self.state_dir = state_dir
        self.privatize = privatize
        self.optimizer = torch.optim.SGD(freeze_head(model, cut), lr=config.learning_rate, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, epoch: int) -> float:
        """Cosine from 1 to 0.05 over the job's epochs."""
        span = max(self.config.epochs - 1, 1)
        return 0.05 + 0.95 * (1 + math.cos(math.pi * min(epoch, span) / span)) / 2

    # state -------------------------------------------------------------------------------------

    @property
    def _weights_path(self) -> Path:
        return self.state_dir / "last.safetensors"

    @property
    def _optim_path(self) -> Path:
        return self.state_dir / "last.optim.pt"

    def save_state(self, epoch: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._weights_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp),
                  metadata={"epoch": str(epoch)})
        tmp.replace(self._weights_path)
        import io

        buf = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "epoch": epoch}, buf)
        write_atomic(self._optim_path, buf.getvalue())

    def restore_state(self) -> int:
        """Epochs already completed by an earlier run of this job (0 on a fresh start)."""
        if not (self._weights_path.exists() and self._optim_path.exists()):
            return 0
        self.model.load_state_dict(load_file(str(self._weights_path), device=self.config.device))
        state = torch.load(self._optim_path, weights_only=True, map_location=self.config.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        log.info("resuming training after epoch %d", state["epoch"])
        return int(state["epoch"])

    # loop --------------------------------------------------------------------------------------

    def fit(self, history: History, on_epoch: Callable[[EpochResult], None],
            on_step: Callable[[int, int, float], None] | None = None) -> History:
        start = self.restore_state()
        history.epochs = [e for e in history.epochs if e.epoch <= start]
        generator = torch.Generator().manual_seed(self.config.seed)
        for epoch in range(start + 1, self.config.epochs + 1):
            loader = DataLoader(self.data, batch_size=self.config.batch_size, shuffle=True,
                                collate_fn=self.task.collate, generator=generator)
            t0 = time.monotonic()
            losses = self.train_epoch(loader, epoch, on_step)
            metrics: dict[str, float] = {}
            if epoch % self.config.eval_interval == 0 or epoch == self.config.epochs:
                metrics = self.task.evaluate(self.model, self.cut, self.privatize, self.config.device)
            seconds = time.monotonic() - t0
            result = EpochResult(epoch, losses, metrics, seconds, len(self.data) / max(seconds, 1e-9))
            self.schedule.step()
            history.epochs.append(result)
            self.save_state(epoch)
            on_epoch(result)
        return history

    def train_epoch(self, loader: DataLoader[StoredSample], epoch: int,
                    on_step: Callable[[int, int, float], None] | None) -> dict[str, float]:
        self.model.train()
        totals: dict[str, float] = {}
        steps = 0
        for batch in loader:
            batch = batch.to(self.config.device)
            output = run_tail(self.model, batch.features, self.cut)
            loss, parts = self.task.loss(self.model, output, batch.targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            steps += 1
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            if on_step is not None:
                on_step(epoch, steps, float(loss.detach()))
        return {k: v / max(steps, 1) for k, v in totals.items()}
