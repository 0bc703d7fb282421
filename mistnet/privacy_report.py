"""``mistnet privacy-report``: how well can the cloud reconstruct an edge's image from what it sends?

The attacker is the most capable one this system has: the cloud itself. It built the head, knows the
encoding (thresholds, bits, ε) and holds public images, so it trains an *inversion decoder* on
public images (head → the job's encoding with fresh randomization each step → decoder → image) and
applies it to what edges send about images it has never seen (the held-out split). The same attack
on real-valued head outputs (no MistNet) is the baseline. Reconstructions are scored with SSIM and
PSNR (scikit-image) against the letterboxed input the head saw.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.datasets.yolo import YoloDataset
from common.privacy import BitEncoder, Thresholds
from common.split import run_head

log = logging.getLogger("mistnet.privacy_report")

BATCH = 8
SAMPLES_SHOWN = 4


class InversionDecoder(nn.Module):
    """Head output ``[B, C, h, w]`` to an image ``[B, 3, h·s, w·s]`` (``s`` = the head's stride),
    one 2x upsampling stage per factor of two."""

    def __init__(self, channels: int, stride: int, width: int = 96) -> None:
        super().__init__()
        stages = int(math.log2(stride))
        if 2**stages != stride:
            raise ValueError(f"head stride {stride} is not a power of two")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU()]
        c = width
        for _ in range(stages):
            nxt = max(16, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, nxt, 3, padding=1)]
            layers += [nn.BatchNorm2d(nxt), nn.SiLU()]
            c = nxt
        layers += [nn.Conv2d(c, 3, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(features)
        return out


@dataclass
class AttackResult:
    setting: str  # "real", "eps=<ε>", or "eps=<ε>,bits=<b>" above 1 bit
    epsilon: float | None
    ssim: float
    psnr: float
    train_seconds: float
    bits: int = 1  # bits per activation of the levels attacked (real-valued features: unused)


Encode = Callable[[torch.Tensor], torch.Tensor]


Box = tuple[int, int, int, int]  # top, left, height, width of the image inside the letterboxed input


def images(dataset: YoloDataset) -> tuple[torch.Tensor, list[Box]]:
    """The letterboxed inputs and where each picture sits in its input (the rest is grey padding)."""
    pixels, boxes = [], []
    for i in dataset.usable:
        sample = dataset.load(i)
        if sample.image is None or sample.letterbox is None:
            continue
        box = sample.letterbox
        (h0, w0), (dw, dh) = box.orig_hw, box.pad
        pixels.append(sample.image)
        boxes.append((round(dh - 0.1), round(dw - 0.1), round(h0 * box.ratio), round(w0 * box.ratio)))
    return torch.from_numpy(np.stack(pixels)), boxes


def augmented(x: torch.Tensor) -> torch.Tensor:
    """The public images and their mirror images."""
    return torch.cat([x, x.flip(-1)])


def batches(count: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    yield from torch.randperm(count, generator=generator).split(BATCH)


def head_output(model: nn.Module, cut: int, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        outputs = run_head(model, x, cut)
    if len(outputs) != 1:
        raise ValueError(f"cut {cut} sends {len(outputs)} head outputs; the attack inverts one")
    return next(iter(outputs.values())).clone()


def train_attack(
    head: torch.Tensor, target: torch.Tensor, encode: Encode, epochs: int, seed: int, progress: Callable[[str], None]
) -> InversionDecoder:
    """L1 reconstruction from the encoded head outputs (fresh randomization every step)."""
    torch.manual_seed(seed)
    stride = target.shape[-1] // head.shape[-1]
    decoder = InversionDecoder(head.shape[1], stride)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(head) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for b in batches(len(head), generator):
            loss = F.l1_loss(decoder(encode(head[b])), target[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(b)
        progress(f"epoch {epoch}/{epochs}: L1 {total / len(head):.4f}")
    return decoder.eval()


@torch.no_grad()
def reconstruct(decoder: InversionDecoder, head: torch.Tensor, encode: Encode) -> torch.Tensor:
    return torch.cat([decoder(encode(head[i : i + BATCH])) for i in range(0, len(head), BATCH)])


def similarity(recon: torch.Tensor, original: torch.Tensor, boxes: list[Box]) -> tuple[float, float]:
    """Mean SSIM and PSNR (data range 1) over the images, each on its picture only: the letterbox
    padding is trivially rebuilt and would flatter every attack."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssims, psnrs = [], []
    for r, o, (top, left, h, w) in zip(recon, original, boxes, strict=True):
        a = r[:, top : top + h, left : left + w].permute(1, 2, 0).numpy().astype(np.float64)
        b = o[:, top : top + h, left : left + w].permute(1, 2, 0).numpy().astype(np.float64)
        ssims.append(structural_similarity(a, b, channel_axis=2, data_range=1.0))
        psnrs.append(peak_signal_noise_ratio(b, a, data_range=1.0))
    return float(np.mean(ssims)), float(np.mean(psnrs))


def encoder_fn(epsilon: float | None, thresholds: Thresholds, layer: int, seed: int, bits: int = 1) -> Encode:
    """What the cloud receives: levels randomized at ε (float 0..1), or the real values (None)."""
    if epsilon is None:
        return lambda y: y
    encoder = BitEncoder(epsilon, seed=seed, bits=bits, thresholds=thresholds)
    return lambda y: encoder.privatize(y, layer)


def setting_name(epsilon: float | None, bits: int) -> str:
    if epsilon is None:
        return "real"
    return f"eps={epsilon:g}" + (f",bits={bits}" if bits > 1 else "")


def prefixed(progress: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda message: progress(f"{prefix}: {message}")


def run_attacks(
    model: nn.Module,
    cut: int,
    public: YoloDataset,
    held_out: YoloDataset,
    epsilons: Sequence[float | None],
    thresholds: Mapping[int, Thresholds],
    bits_at: Callable[[float], int],
    epochs: int,
    progress: Callable[[str], None],
) -> tuple[list[AttackResult], dict[str, torch.Tensor], torch.Tensor]:
    """One attack per setting (ε, with ``bits_at(ε)`` bits per activation and the ``thresholds`` of
    that many bits): results, a few reconstructions per setting, and their originals."""
    model.eval()
    train_x = augmented(images(public)[0])
    test_x, boxes = images(held_out)
    train_h, test_h = head_output(model, cut, train_x), head_output(model, cut, test_x)
    layer = next(iter(run_head(model, test_x[:1], cut)))
    results, shown = [], {}
    for k, eps in enumerate(epsilons):
        bits = 1 if eps is None else bits_at(eps)
        setting = setting_name(eps, bits)
        t0 = time.monotonic()
        encode = encoder_fn(eps, thresholds.get(bits, {}), layer, k, bits)
        decoder = train_attack(train_h, train_x, encode, epochs, k, prefixed(progress, setting))
        seconds = time.monotonic() - t0
        recon = reconstruct(decoder, test_h, encoder_fn(eps, thresholds.get(bits, {}), layer, 1000 + k, bits))
        ssim, psnr = similarity(recon, test_x, boxes)
        results.append(AttackResult(setting, eps, round(ssim, 4), round(psnr, 2), round(seconds, 1), bits))
        progress(f"{setting}: SSIM {ssim:.3f}, PSNR {psnr:.2f} dB on {len(test_x)} held-out images")
        shown[setting] = recon[:SAMPLES_SHOWN]
    return results, shown, test_x[:SAMPLES_SHOWN]


def plot_samples(
    shown: dict[str, torch.Tensor], originals: torch.Tensor, results: list[AttackResult], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", originals), *shown.items()]
    by_setting = {r.setting: r for r in results}
    fig, axes = plt.subplots(len(rows), len(originals), figsize=(2.2 * len(originals), 2.3 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c, img in enumerate(imgs):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        res = by_setting.get(name)
        label = name if res is None else f"{name}\nSSIM {res.ssim:.2f}\nPSNR {res.psnr:.1f}"
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle("Feature inversion by the cloud (held-out images)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[AttackResult], images_evaluated: int) -> str:
    lines = ["| what the cloud receives | SSIM | PSNR (dB) | attack training (s) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {received(r.epsilon, r.bits)} | {r.ssim:.3f} | {r.psnr:.2f} | {r.train_seconds:.0f} |")
    lines.append(
        f"\nSSIM/PSNR: means over {images_evaluated} held-out images, on each picture without its letterbox "
        "padding (SSIM 1 = identical)."
    )
    return "\n".join(lines)


def received(epsilon: float | None, bits: int) -> str:
    """What the cloud receives in one attack's setting, in words."""
    if epsilon is None:
        return "real-valued head outputs (no MistNet)"
    return f"MistNet {bits}-bit levels, ε = {epsilon:g}"


def write_privacy_report(results: list[AttackResult], out: Path, meta: dict[str, object]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "privacy-report.json"
    path.write_text(json.dumps({**meta, "attacks": [asdict(r) for r in results]}, indent=1))
    return path
