"""Trains the tail on spooled features, one checkpoint per completed epoch so a crash resumes.

The recipe follows upstream YOLOv5's ``train.py`` where it applies to a tail fine-tune: SGD with
Nesterov momentum 0.937, weight decay on convolution/linear weights only, a linear warmup of the
learning rate (and of momentum, from 0.8) followed by a cosine decay to ``final_lr_ratio``, gradient
clipping, and mixed precision on CUDA. The head stays frozen: its parameters are not optimized and
never run here (features come from the spool, streamed batch by batch).

Before the first epoch the tail's BatchNorm statistics are re-estimated on the training features
(no gradient step): the pretrained statistics describe real-valued activations, not bits, and this
alone recovers much of a pretrained detector's accuracy on binarized features
(see ``shared/notes/mistnet-utility-measurements.md``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split

from cloud_agent.tasks import Batch, CloudTask, Privatize
from common import constants as C
from common.batchnorm import batchnorms, cumulative_statistics
from common.models.cutdecoder import attached
from common.split import layers_of, run_tail
from common.storage import write_atomic

log = logging.getLogger("mistnet.cloud.trainer")

WARMUP_MAX_STEPS = 300
WARMUP_MAX_EPOCHS = 3
WARMUP_MOMENTUM = 0.8
# In the state directory: the selected epoch's weights (what ships) and the last completed epoch's.
BEST_WEIGHTS, LAST_WEIGHTS = "best.safetensors", "last.safetensors"


class Samples(Protocol):
    """What the trainer batches: spooled features, or images for the centralized baseline."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    eval_interval: int = 1
    device: str = "cpu"
    seed: int = 0
    momentum: float = 0.937
    weight_decay: float = 5e-4
    final_lr_ratio: float = 0.01  # upstream lrf: the last step runs at learning_rate * this
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    amp: bool = True  # float16 autocast + gradient scaling, only when the device is CUDA
    recalibrate_bn: bool = True  # re-estimate the tail's BatchNorm statistics before epoch 1
    tail_layers: int | None = None  # train only this many tail layers next to the cut (None: all)
    # The cut decoder (when the model has one) trains with the tail (cloud.train_decoder).
    train_decoder: bool = True


@dataclass
class EpochResult:
    epoch: int
    losses: dict[str, float]
    metrics: dict[str, float]
    seconds: float
    images_per_s: float
    selection_loss: float | None = None  # mean loss on the received samples held back for selection
    selection_score: float | None = None  # the task's headline metric on them (mAP, accuracy)


@dataclass
class Selection:
    """The epoch whose weights ship: the best task metric (mAP, accuracy) on held-back received
    samples, the lower loss breaking ties, epoch 0 being the model before any training (so a job
    never ships a model worse than it started from). Selections saved before the metric was
    recorded (``score`` None) compare by loss."""

    epoch: int
    loss: float
    before: float  # the starting model's loss on the same samples
    score: float | None = None
    score_before: float | None = None

    def beats(self, other: Selection | None) -> bool:
        if other is None:
            return True
        if self.score is None or other.score is None or self.score == other.score:
            return self.loss < other.loss
        return self.score > other.score


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps([e.__dict__ for e in self.epochs])

    @classmethod
    def from_json(cls, text: str | None) -> History:
        return cls([EpochResult(**e) for e in json.loads(text)] if text else [])


def selection_split(data: Samples, fraction: float, seed: int) -> tuple[Samples, Samples | None]:
    """A seeded share of the received samples held back to choose the epoch that ships, and the rest
    to train on; no split when there are too few samples to tell epochs apart."""
    held = int(len(data) * fraction)
    if fraction <= 0 or len(data) < C.MIN_SELECTION_SAMPLES or held < 1:
        return data, None
    generator = torch.Generator().manual_seed(seed)
    train, selection = random_split(cast(Dataset[Any], data), [len(data) - held, held], generator=generator)
    return train, selection


def shipped_weights(state_dir: Path) -> Path | None:
    """The weights a finished training ships: the selected epoch's, else the last epoch's (None: untrained)."""
    for name in (BEST_WEIGHTS, LAST_WEIGHTS):
        if (state_dir / name).exists():
            return state_dir / name
    return None


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The model's weights as safetensors, written atomically: a crash leaves the previous file whole."""
    write_atomic(path, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata))


def freeze_head(model: nn.Module, cut: int) -> list[nn.Parameter]:
    """Head frozen; returns the tail's parameters, the only ones the optimizer sees."""
    tail = []
    for i, layer in enumerate(layers_of(model)):
        for p in layer.parameters():
            p.requires_grad_(i >= cut)
            if i >= cut:
                tail.append(p)
    return tail


def trainable_parameters(
    model: nn.Module, cut: int, tail_layers: int | None, train_decoder: bool
) -> tuple[list[nn.Parameter], range]:
    """The parameters the optimizer sees, and the tail layers they belong to: those of the first
    ``tail_layers`` tail layers (all when None), and the cut decoder's (when the model has one) if
    ``train_decoder``. The rest of the model is frozen: on ~100 images, fewer trainable layers
    memorise less."""
    tail = freeze_head(model, cut)
    layers = layers_of(model)
    trained = range(cut, len(layers) if tail_layers is None else min(len(layers), cut + tail_layers))
    keep = {id(p) for i in trained for p in layers[i].parameters()}
    for p in tail:
        p.requires_grad_(id(p) in keep)
    decoder = attached(model)
    extra = list(decoder.parameters()) if decoder is not None else []
    for p in extra:
        p.requires_grad_(train_decoder)
    if not train_decoder:
        extra = []
    return extra + [p for p in tail if id(p) in keep], trained


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on convolution/linear weights only; BatchNorm weights and biases are not decayed."""
    params = list(params)
    decay = [p for p in params if p.dim() > 1]
    plain = [p for p in params if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def warmup_steps(steps_per_epoch: int, epochs: int) -> int:
    """Warmup length: a tenth of the job rounded to 1..3 epochs, at most 300 steps, and never more
    than a third of all steps (a short job still trains mostly at full rate)."""
    total = steps_per_epoch * epochs
    warm_epochs = min(WARMUP_MAX_EPOCHS, max(1, round(epochs / 10)))
    return max(1, min(WARMUP_MAX_STEPS, steps_per_epoch * warm_epochs, total // 3))


def lr_factor(step: int, total: int, warmup: int, final: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``:
    cosine from 1 to ``final`` over the job, ramped linearly from 0 during the warmup."""
    progress = min(step, total) / max(total, 1)
    cosine = final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2
    return cosine * min(1.0, (step + 1) / warmup)


def batchnorm_layers(model: nn.Module, cut: int) -> list[nn.modules.batchnorm._BatchNorm]:
    return batchnorms(model, range(cut, len(layers_of(model))))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cut: int,
        task: CloudTask,
        data: Samples,
        config: TrainConfig,
        state_dir: Path,
        privatize: Privatize,
        selection: Samples | None = None,
    ) -> None:
        """``selection``: received samples never trained on, which choose the epoch to ship; without
        them the last epoch ships."""
        self.model = model.to(config.device)
        self.selection_data = selection
        self.cut = cut
        self.task = task
        self.data = data
        self.config = config
        self.state_dir = state_dir
        self.privatize = privatize
        self.params, self.trained_layers = trainable_parameters(model, cut, config.tail_layers, config.train_decoder)
        self.optimizer = torch.optim.SGD(
            param_groups(self.params, config.weight_decay),
            lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=True,
        )
        self.device_type = torch.device(config.device).type
        self.amp = config.amp and self.device_type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.steps_per_epoch = math.ceil(len(data) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup = warmup_steps(self.steps_per_epoch, config.epochs)
        self.step = 0
        self.skipped_steps = 0

    def set_schedule(self, step: int) -> None:
        """Learning rate and momentum for optimizer step ``step``."""
        factor = lr_factor(step, self.total_steps, self.warmup, self.config.final_lr_ratio)
        ramp = min(1.0, step / self.warmup)
        momentum = WARMUP_MOMENTUM + (self.config.momentum - WARMUP_MOMENTUM) * ramp
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * factor
            group["momentum"] = min(momentum, self.config.momentum)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # state -------------------------------------------------------------------------------------

    @property
    def _weights_path(self) -> Path:
        return self.state_dir / LAST_WEIGHTS

    @property
    def _optim_path(self) -> Path:
        return self.state_dir / "last.optim.pt"

    @property
    def _best_path(self) -> Path:
        return self.state_dir / BEST_WEIGHTS

    @property
    def _selection_path(self) -> Path:
        return self.state_dir / "selection.json"

    @property
    def selection(self) -> Selection | None:
        """The epoch chosen so far (None: no selection samples, or no epoch considered yet)."""
        if not self._selection_path.exists():
            return None
        return Selection(**json.loads(self._selection_path.read_text()))

    def consider(self, epoch: int) -> tuple[float, float] | None:
        """Scores this epoch's weights on the selection samples and keeps them if they are the best
        so far; returns their (loss, score)."""
        if not self.selection_data:
            return None
        loss, score = self.selection_scores()
        best = self.selection
        candidate = Selection(epoch, loss, loss, score, score) if best is None else \
            Selection(epoch, loss, best.before, score, best.score_before)  # fmt: skip
        if candidate.beats(best):
            save_weights(self.model, self._best_path)
            write_atomic(self._selection_path, json.dumps(candidate.__dict__).encode())
        return loss, score

    def restore_selected(self) -> Selection | None:
        """Loads the chosen epoch's weights into the model (a no-op without selection samples)."""
        chosen = self.selection
        if chosen is not None:
            self.model.load_state_dict(load_file(str(self._best_path), device=self.config.device))
            log.info("selected epoch %d (held-back %s %.4f, loss %.4f; before training %.4f, %.4f)", chosen.epoch,
                     self.task.headline, chosen.score or 0.0, chosen.loss, chosen.score_before or 0.0,
                     chosen.before)  # fmt: skip
        return chosen

    @torch.no_grad()
    def selection_scores(self) -> tuple[float, float]:
        """Mean loss per batch and the task's metric on the selection samples, in one pass with
        BatchNorm on its running statistics (the model as it would ship)."""
        self.model.eval()
        total, batches, tallies = 0.0, 0, []
        loader = DataLoader(cast(Dataset[Any], self.selection_data), batch_size=self.config.batch_size,
                            collate_fn=self.task.collate)  # fmt: skip
        for batch in loader:
            batch = batch.to(self.config.device)
            with torch.autocast(self.device_type, dtype=torch.float16, enabled=self.amp):
                output = run_tail(self.model, batch.features, self.cut)
                loss, _ = self.task.loss(self.model, output, batch.targets)
            tallies.append(self.task.tally(output, batch.targets))
            total += float(loss)
            batches += 1
        return total / max(batches, 1), self.task.score(tallies)

    def save_state(self, epoch: int) -> None:
        save_weights(self.model, self._weights_path, {"epoch": str(epoch)})
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "step": self.step,
            },
            buf,
        )
        write_atomic(self._optim_path, buf.getvalue())

    def restore_state(self) -> int:
        """Epochs already completed by an earlier run of this job (0 on a fresh start)."""
        if not (self._weights_path.exists() and self._optim_path.exists()):
            return 0
        self.model.load_state_dict(load_file(str(self._weights_path), device=self.config.device))
        state = torch.load(self._optim_path, weights_only=True, map_location=self.config.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        epoch = int(state["epoch"])
        self.step = int(state.get("step", epoch * self.steps_per_epoch))
        log.info("resuming training after epoch %d (step %d)", epoch, self.step)
        return epoch

    # loop --------------------------------------------------------------------------------------

    def loader(
        self, generator: torch.Generator | None, shuffle: bool = True, **options: Any
    ) -> DataLoader[Any]:
        """``options``: further DataLoader arguments (the benchmarks try worker processes)."""
        return DataLoader(
            cast(Dataset[Any], self.data),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            collate_fn=self.task.collate,
            generator=generator,
            pin_memory=self.device_type == "cuda",
            **options,
        )

    def fit(
        self,
        history: History,
        on_epoch: Callable[[EpochResult], None],
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> History:
        start = self.restore_state()
        history.epochs = [e for e in history.epochs if e.epoch <= start]
        if start == 0 and self.config.recalibrate_bn and len(self.data):
            self.recalibrate_batchnorm()
        if start == 0:
            self.consider(0)
        for epoch in range(start + 1, self.config.epochs + 1):
            t0 = time.monotonic()
            # One seed per epoch: a resumed job shuffles exactly as an uninterrupted one would.
            generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            losses = self.train_epoch(self.loader(generator), epoch, on_step)
            metrics: dict[str, float] = {}
            if epoch % self.config.eval_interval == 0 or epoch == self.config.epochs:
                metrics = self.task.evaluate(self.model, self.cut, self.privatize, self.config.device)
            selected = self.consider(epoch)
            seconds = time.monotonic() - t0
            result = EpochResult(epoch, losses, metrics, seconds, len(self.data) / max(seconds, 1e-9),
                                 *(selected or (None, None)))  # fmt: skip
            history.epochs.append(result)
            self.save_state(epoch)
            on_epoch(result)
        return history

    def forward_loss(
        self, batch: Batch, tail: Callable[[dict[int, torch.Tensor]], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``tail``: what runs the tail (default: the model's own layers; DDP's wrapper when distributed)."""
        with torch.autocast(self.device_type, dtype=torch.float16, enabled=self.amp):
            output = run_tail(self.model, batch.features, self.cut) if tail is None else tail(batch.features)
            return self.task.loss(self.model, output, batch.targets)

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss a training step descends (``cloud_agent.distributed`` runs it through DDP)."""
        return self.forward_loss(batch)

    def train_mode(self) -> None:
        """Training mode, except that frozen layers' BatchNorm keeps its statistics (the Detect layer
        stays in training mode whatever is trained: the loss reads its training-mode output)."""
        self.model.train()
        frozen = [layer for i, layer in enumerate(layers_of(self.model)) if i not in self.trained_layers]
        decoder = attached(self.model)
        if decoder is not None and not self.config.train_decoder:
            frozen.append(decoder)
        for layer in frozen:
            for m in layer.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_epoch(
        self, loader: DataLoader[Any], epoch: int, on_step: Callable[[int, int, float], None] | None
    ) -> dict[str, float]:
        self.train_mode()
        totals: dict[str, float] = {}
        steps = 0
        for batch in loader:
            batch = self.task.augment(batch).to(self.config.device)
            self.set_schedule(self.step)
            loss, parts = self.training_loss(batch)
            self.step += 1
            if not torch.isfinite(loss.detach()):
                self.skipped_steps += 1
                log.warning("epoch %d: non-finite loss %s, batch skipped", epoch, parts)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            steps += 1
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            if on_step is not None:
                on_step(epoch, steps, float(loss.detach()))
        return {k: v / max(steps, 1) for k, v in totals.items()}

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """The tail's BatchNorm running statistics re-estimated as plain averages over one pass of the
        training features (as ``torch.optim.swa_utils.update_bn``); no weight changes."""
        layers = batchnorm_layers(self.model, self.cut)
        if not layers:
            return
        t0 = time.monotonic()
        self.model.train()
        with cumulative_statistics(layers):
            for batch in self.loader(None, shuffle=False):
                batch = batch.to(self.config.device)
                with torch.autocast(self.device_type, dtype=torch.float16, enabled=self.amp):
                    run_tail(self.model, batch.features, self.cut)
        log.info(
            "re-estimated %d BatchNorm layers of the tail on %d samples (%.1f s)",
            len(layers),
            len(self.data),
            time.monotonic() - t0,
        )
