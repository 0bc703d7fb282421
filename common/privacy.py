"""The MistNet privacy mechanism, in one place: activations → bits → randomized response → bytes.

Every activation becomes one bit (``x > threshold``), and each bit is then kept with probability
``p = e^(ε/2) / (e^(ε/2) + 1)`` and flipped otherwise (symmetric randomized response). ``ε`` is the
budget per bit as the reference implementation defines it (the MistNet paper's ε is half of it).
Bits are packed 8 per byte, so a sample costs ``ceil(C·H·W / 8)`` bytes on the wire.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from common.errors import ProtocolError
from common.protocol import FeatureLayout, packed_size


def keep_probability(epsilon: float) -> float:
    """Probability that randomized response reports a bit truthfully."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return 1.0 / (1.0 + math.exp(-epsilon / 2.0))


def binarize(x: torch.Tensor, threshold: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bit per activation; a per-channel threshold broadcasts over [C, H, W]."""
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 1:
        threshold = threshold.view(-1, *([1] * (x.dim() - 2))) if x.dim() > 2 else threshold
    return x > threshold


def randomized_response(bits: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each bit independently with probability 1 - p."""
    flip_p = 1.0 - keep_probability(epsilon)
    if flip_p < 1e-12:
        return bits
    flips = torch.rand(bits.shape, generator=generator, device=bits.device) < flip_p
    return bits ^ flips


def pack_bits(bits: torch.Tensor) -> bytes:
    return np.packbits(bits.detach().to("cpu", torch.uint8).numpy().ravel()).tobytes()


def unpack_bits(data: bytes, shape: list[int]) -> torch.Tensor:
    """The exact inverse of :func:`pack_bits`, as float 0/1 in ``shape``."""
    count = math.prod(shape)
    if len(data) != -(-count // 8):
        raise ProtocolError(f"{len(data)} bytes cannot hold {count} bits of shape {shape}")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
    return torch.from_numpy(flat.reshape(shape)).float()


def make_generator(seed: int | None = None) -> torch.Generator:
    """Unseeded by default: the randomization must not be predictable by the receiver."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


class BitEncoder:
    """What the edge applies to each head output before it leaves the device."""

    def __init__(self, epsilon: float, seed: int | None = None) -> None:
        self.epsilon = epsilon
        self.generator = make_generator(seed)

    def privatize(self, x: torch.Tensor) -> torch.Tensor:
        return randomized_response(binarize(x), self.epsilon, self.generator)

    def encode(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], list[bytes]]:
        """The batch's layout and, per sample, its head outputs packed back to back."""
        per_layer = {i: self.privatize(y.detach().cpu()) for i, y in outputs.items()}
        layout = [FeatureLayout(layer=i, shape=list(bits.shape[1:])) for i, bits in per_layer.items()]
        batch = next(iter(per_layer.values())).shape[0]
        return layout, [b"".join(pack_bits(bits[b]) for bits in per_layer.values()) for b in range(batch)]


def decode_features(layout: list[FeatureLayout], data: bytes, bits: int = 1) -> dict[int, torch.Tensor]:
    """Cloud side: one sample's packed bytes back to 0/1 float tensors keyed by layer index."""
    if bits != 1:
        raise ProtocolError(f"{bits}-bit features are not supported by this decoder")
    sizes = packed_size(layout, bits)
    if len(data) != sum(sizes):
        raise ProtocolError(f"sample has {len(data)} bytes of features, layout needs {sum(sizes)}")
    out = {}
    offset = 0
    for f, size in zip(layout, sizes, strict=True):
        out[f.layer] = unpack_bits(data[offset : offset + size], f.shape)
        offset += size
    return out


def feature_transform(
    metadata: Mapping[str, Any], randomize: bool = False
) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]:
    """The deployed path for a MistNet checkpoint: head outputs become the bits its tail was trained on.

    Randomized response is off by default at inference: it protects data leaving an edge, and a
    model evaluated where the image already is gains no privacy from it.
    """
    bits = int(metadata.get("bits", 1))
    if bits != 1:
        raise ProtocolError(f"{bits}-bit features are not supported by this build")
    encoder = BitEncoder(float(metadata.get("epsilon", 100.0))) if randomize else None

    def transform(outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if encoder is not None:
            return {i: encoder.privatize(y).float() for i, y in outputs.items()}
        return {i: binarize(y).float() for i, y in outputs.items()}

    return transform


def wire_bytes_per_sample(shapes: list[list[int]], bits: int = 1) -> int:
    """ceil(activations · bits / 8) per head output, summed: the payload floor of one sample."""
    return sum(-(-math.prod(s) * bits // 8) for s in shapes)
