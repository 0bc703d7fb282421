"""Before the job: adapt the cloud's model to what will cross the cut, using public images only.

Two steps, both on the pretrained head's outputs for the job's ``cloud.public`` images (never edge
data; unlabelled images are enough):

1. **Threshold calibration** (``privacy.thresholds: calibrated``): per-channel quantiles of the
   activations, so every level is equally likely. The thresholds travel to the edges in the job
   assignment, which is why this runs before the job is offered.
2. **Cut decoder** (``cloud.adapt.decoder``): a small network trained to map the job's levels,
   randomized exactly as the edges will randomize them (at each edge's ε) and clean, back to the
   real activations; the pretrained tail then runs on its output (:mod:`common.models.cutdecoder`).

Public images are augmented (two scales, horizontal flips) so a few dozen images give enough
variety. The result is stored in the job's directory, so a restarted cloud reuses it: the edges
may already hold the thresholds.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.datasets.mnist import load_tensors
from common.datasets.yolo import decode_image, discover_images, letterbox, to_tensor
from common.errors import DatasetError
from common.jobspec import AdaptSpec
from common.models.cutdecoder import CutDecoder
from common.privacy import BitEncoder, calibrate_thresholds, thresholds_to_metadata
from common.protocol import LayerThresholds
from common.split import layers_of, run_head, run_layers

log = logging.getLogger("mistnet.cloud.adaptation")

PUBLIC_SCALES = (1.0, 0.7)  # of the job's image size; smaller copies are letterboxed into the square
MAX_PUBLIC_IMAGES = 256  # x 4 augmented copies held as float16 head outputs
HEAD_BATCH = 8
CALIBRATION_VALUES = 1 << 20  # public activations per channel that thresholds are calibrated on
DECODER_BATCH = 8
WARMUP_FRACTION = 0.1

Progress = Callable[[str], None]


@dataclass
class Adaptation:
    """What adaptation produced: thresholds per head output (empty: ``x > 0``) and the decoder."""

    bits: int
    thresholds: dict[int, torch.Tensor]
    decoder: CutDecoder | None

    def encoding(self) -> dict[str, Any]:
        """The encoding as checkpoint metadata records it (``feature_transform`` replays it)."""
        meta: dict[str, Any] = {"bits": self.bits, "thresholds": thresholds_to_metadata(self.thresholds)}
        if self.decoder is not None:
            meta["decoder"] = self.decoder.config()
        return meta

    def wire_thresholds(self) -> list[LayerThresholds] | None:
        return [LayerThresholds(layer=i, values=t.tolist()) for i, t in self.thresholds.items()] or None

    def save(self, path: Path) -> None:
        tensors = {f"thresholds.{i}": t.contiguous() for i, t in self.thresholds.items()}
        meta: dict[str, object] = {"bits": self.bits}
        if self.decoder is not None:
            tensors.update({f"decoder.{k}": v.contiguous() for k, v in self.decoder.state_dict().items()})
            meta["decoder"] = self.decoder.config()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"adaptation": json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Adaptation:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["adaptation"])
        tensors = load_file(str(path))
        thresholds = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("thresholds.")}
        decoder = None
        if "decoder" in meta:
            decoder = CutDecoder.from_config(meta["decoder"])
            decoder.load_state_dict({k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")})
        return cls(int(meta["bits"]), thresholds, decoder)


def public_images(folder: Path) -> list[Path]:
    paths = discover_images(folder)
    if not paths:
        raise DatasetError(f"cloud.public {folder}: no images found")
    if len(paths) > MAX_PUBLIC_IMAGES:
        log.warning("cloud.public has %d images: using the first %d", len(paths), MAX_PUBLIC_IMAGES)
    return paths[:MAX_PUBLIC_IMAGES]


def augmented_inputs(paths: Sequence[Path], image_size: int) -> Iterator[torch.Tensor]:
    """Batches of letterboxed public images at each of :data:`PUBLIC_SCALES`, and their mirror images."""
    batch: list[torch.Tensor] = []
    for path in paths:
        image = decode_image(path)
        for scale in PUBLIC_SCALES:
            pixels, _ = letterbox(image, max(32, round(image_size * scale)), (image_size, image_size))
            x = torch.from_numpy(to_tensor(pixels))
            batch += [x, x.flip(-1)]
        while len(batch) >= HEAD_BATCH:
            yield torch.stack(batch[:HEAD_BATCH])
            batch = batch[HEAD_BATCH:]
    if batch:
        yield torch.stack(batch)


def public_inputs(public: Path, image_size: int) -> Iterator[torch.Tensor]:
    """Batches of public inputs: an image folder (augmented, see :func:`augmented_inputs`) or, for
    MNIST jobs, an ``.npz`` of digits as the demo writes them."""
    if public.suffix == ".npz":
        images, _ = load_tensors(public)
        yield from images[: MAX_PUBLIC_IMAGES * 4].split(HEAD_BATCH)
        return
    yield from augmented_inputs(public_images(public), image_size)


@torch.inference_mode()
def head_outputs(
    model: nn.Module,
    cut: int,
    inputs: Iterator[torch.Tensor],
    device: str,
    dtype: torch.dtype = torch.float16,
    enough: int | None = None,
) -> dict[int, torch.Tensor]:
    """The head's outputs for every input, concatenated per layer, as ``dtype`` on the CPU; with
    ``enough``, for the first inputs only, until every output holds that many values per channel."""
    model.eval()
    parts: dict[int, list[torch.Tensor]] = {}
    for x in inputs:
        for i, y in run_head(model, x.to(device), cut).items():
            parts.setdefault(i, []).append(y.to("cpu", dtype))
        if enough is not None and all(sum(p[0].numel() for p in ys) >= enough for ys in parts.values()):
            break
    return {i: torch.cat(p) for i, p in parts.items()}


def calibration_outputs(
    model: nn.Module, cut: int, inputs: Iterator[torch.Tensor], device: str
) -> dict[int, torch.Tensor]:
    """What thresholds are calibrated on: float32 head outputs, as edges compute them, of enough
    inputs for :func:`calibrate_thresholds`' sample. In float16 (what the decoder trains on) a
    threshold in the middle of a gap between values lies on a float16 rounding boundary, which the
    float32 value that many activations share (the letterbox padding's) may sit right next to."""
    return head_outputs(model, cut, inputs, device, torch.float32, CALIBRATION_VALUES)


def calibrate(outputs: dict[int, torch.Tensor], bits: int) -> dict[int, torch.Tensor]:
    return {i: calibrate_thresholds(y, bits, CALIBRATION_VALUES) for i, y in outputs.items() if y.dim() == 4}


def new_decoder(outputs: dict[int, torch.Tensor], width: int) -> CutDecoder:
    """A decoder for every image-shaped head output, standardized by the public activations' statistics."""
    decoder = CutDecoder({i: y.shape[1] for i, y in outputs.items() if y.dim() == 4}, width)
    for i, y in outputs.items():
        if y.dim() == 4:
            per_channel = y.transpose(0, 1).reshape(y.shape[1], -1).float()
            level = decoder.decoder(i)
            level.mean.copy_(per_channel.mean(1))
            level.std.copy_(per_channel.std(1).clamp(min=1e-6))
    return decoder


@dataclass
class Distillation:
    """Match the frozen pretrained tail's first ``layers`` outputs on decoded vs real activations:
    the decoder is then judged by what the tail makes of its errors, not only by their size."""

    model: nn.Module  # the pretrained model, frozen, in eval mode (its BatchNorm statistics stay)
    cut: int
    layers: int
    weight: float

    @classmethod
    def of(cls, model: nn.Module, cut: int, layers: int, weight: float) -> Distillation:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return cls(teacher, cut, layers, weight)

    def loss(self, decoded: dict[int, torch.Tensor], real: dict[int, torch.Tensor]) -> torch.Tensor:
        stop = min(self.cut + self.layers, len(layers_of(self.model)) - 1)  # never the detection layer
        with torch.no_grad():
            teacher = dict(real)
            run_layers(self.model, teacher, self.cut, stop)
        student = dict(decoded)
        run_layers(self.model, student, self.cut, stop)
        errors = [((student[i] - teacher[i]) ** 2).mean() / (teacher[i].var() + 1e-6) for i in range(self.cut, stop)]
        return self.weight * torch.stack(errors).sum()


def train_decoder(
    decoder: CutDecoder,
    outputs: dict[int, torch.Tensor],
    encoders: Sequence[BitEncoder],
    distillation: Distillation | None,
    schedule: DecoderSchedule,
    on_epoch: Callable[[int, float], None],
) -> CutDecoder:
    """Regress the real head outputs from their levels, plus the distillation loss; AdamW, warmup,
    cosine decay.

    Every other batch is randomized as an edge will randomize it (one encoder per distinct ε, taken
    in turn); the batches between stay clean. The decoder serves both: the edges' randomized bits
    while the tail is fine-tuned, and clean levels when the model runs where the image is (held-out
    evaluation, deployment). Trained on randomized bits only, it loses accuracy on clean ones at small
    ε (ε = 4, held-out mAP50-95: 0.270 against 0.288 with clean batches mixed in)."""
    device = schedule.device
    decoder.to(device).train()
    count = len(next(iter(outputs.values())))
    steps_per_epoch = math.ceil(count / DECODER_BATCH)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=schedule.learning_rate, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, schedule.learning_rate, total_steps=schedule.epochs * steps_per_epoch, pct_start=WARMUP_FRACTION
    )
    generator = torch.Generator().manual_seed(schedule.seed)
    step = 0
    for epoch in range(1, schedule.epochs + 1):
        total = 0.0
        for batch in torch.randperm(count, generator=generator).split(DECODER_BATCH):
            encoder = encoders[(step // 2) % len(encoders)]
            real = {i: y[batch].float() for i, y in outputs.items()}
            encode = encoder.privatize if step % 2 == 0 else encoder.quantized
            levels = {i: encode(y, i).to(device) for i, y in real.items()}
            real = {i: y.to(device) for i, y in real.items()}
            decoded = decoder(levels)
            loss = torch.stack(
                [decoder.decoder(i).standardized_error(decoded[i], real[i]) for i in decoder.channels]
            ).sum()
            if distillation is not None:
                loss = loss + distillation.loss(decoded, real)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr.step()
            total += float(loss.detach())
            step += 1
        on_epoch(epoch, total / steps_per_epoch)
    return decoder.eval()


@dataclass(frozen=True)
class DecoderSchedule:
    epochs: int
    learning_rate: float
    device: str
    seed: int


def adapt(
    model: nn.Module,
    cut: int,
    public: Path,
    image_size: int,
    epsilons: Sequence[float],
    bits: int,
    calibrated: bool,
    spec: AdaptSpec,
    device: str,
    seed: int,
    progress: Progress,
) -> Adaptation:
    """Calibrate thresholds and (``spec.decoder``) train the cut decoder on the public images."""
    t0 = time.monotonic()
    outputs = head_outputs(model, cut, public_inputs(public, image_size), device)
    samples = len(next(iter(outputs.values())))
    progress(f"adapting: {samples} public head outputs from {public}")
    thresholds = {}
    if calibrated:
        thresholds = calibrate(calibration_outputs(model, cut, public_inputs(public, image_size), device), bits)
    decoder = None
    if spec.decoder:
        encoders = [BitEncoder(eps, seed=seed + k, bits=bits, thresholds=thresholds) for k, eps in enumerate(epsilons)]
        distillation = Distillation.of(model, cut, spec.distill_layers, spec.distill) if spec.distill > 0 else None

        def on_epoch(epoch: int, loss: float) -> None:
            progress(f"adapting: cut decoder epoch {epoch}/{spec.epochs}, loss {loss:.3f}")

        schedule = DecoderSchedule(spec.epochs, spec.learning_rate, device, seed)
        torch.manual_seed(seed)  # the decoder's initial weights: same job, same decoder
        decoder = train_decoder(new_decoder(outputs, spec.width), outputs, encoders, distillation, schedule, on_epoch)
    log.info("adaptation done in %.1f s (%d public head outputs)", time.monotonic() - t0, samples)
    return Adaptation(bits, thresholds, decoder)
