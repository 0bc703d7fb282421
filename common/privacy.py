"""The MistNet privacy mechanism, in one place: activations → bits → randomized response → bytes.

Every activation becomes one bit (``x > threshold``), and each bit is then kept with probability
``p = e^(ε/2) / (e^(ε/2) + 1)`` and flipped otherwise (symmetric randomized response). ``ε`` is the
budget per bit as the reference implementation defines it (the MistNet paper's ε is half of it).
Bits are packed 8 per byte, so a sample costs ``ceil(C·H·W / 8)`` bytes on the wire.

The edge's hot path (:meth:`BitEncoder.encode_packed`) never materialises a float or bool mask of
random numbers: it packs the activation bits first and then flips them in the packed domain with
a mask whose bits are independent Bernoulli(1 - p) draws built from 64-bit random words
(:func:`flip_mask`). That is the same mechanism as :func:`randomized_response`, 7-9x
cheaper; its flip probability is ``1 - p`` rounded *up* to a multiple of 2^-32 (never less noise
than asked for; ``torch.rand`` in :func:`randomized_response` resolves 2^-24).
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

# Resolution of the packed-domain flip probability: 1 - p is rounded up to a multiple of 2^-32.
FLIP_PRECISION_BITS = 32
# Below this flip probability randomized response is skipped (epsilon >= ~55: pure binarization).
MIN_FLIP_PROBABILITY = 1e-12
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


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
    if flip_p < MIN_FLIP_PROBABILITY:
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


def make_rng(seed: int | None = None) -> np.random.Generator:
    """The packed path's generator (PCG64); unseeded by default, like :func:`make_generator`."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))


def flip_threshold(epsilon: float, precision: int = FLIP_PRECISION_BITS) -> int:
    """``ceil((1 - p) · 2^precision)``: the flip probability as an integer numerator (0: no flips)."""
    flip_p = 1.0 - keep_probability(epsilon)
    if flip_p < MIN_FLIP_PROBABILITY:
        return 0
    return min(math.ceil(flip_p * (1 << precision)), (1 << precision) - 1)


def flip_mask(
    rng: np.random.Generator, nbytes: int, threshold: int, precision: int = FLIP_PRECISION_BITS
) -> np.ndarray:
    """``nbytes`` bytes whose bits are independent, each 1 with probability ``threshold / 2^precision``.

    Binary-expansion construction, 64 bits at a time: with ``q = 0.b1 b2 … bk`` in binary, start
    from a uniform random word at the lowest set bit of ``q`` and walk up to ``b1``, OR-ing in a
    fresh uniform word where the bit is 1 and AND-ing one where it is 0. Each step maps a bit's
    probability ``v`` to ``(1 + v) / 2`` or ``v / 2``, which ends at exactly ``q`` for every bit
    position independently. Costs ``precision`` random words per 64 output bits, no floats.
    """
    words = -(-nbytes // 8)
    if threshold <= 0 or words == 0:
        return np.zeros(nbytes, np.uint8)
    low = (threshold & -threshold).bit_length() - 1
    mask: np.ndarray = rng.bit_generator.random_raw(words)
    for i in range(low + 1, precision):
        word = rng.bit_generator.random_raw(words)
        if (threshold >> i) & 1:
            np.bitwise_or(mask, word, out=mask)
        else:
            np.bitwise_and(mask, word, out=mask)
    return mask.view(np.uint8)[:nbytes]


def pack_rows(bits: torch.Tensor) -> np.ndarray:
    """Bool ``[B, ...]`` to uint8 ``[B, ceil(n/8)]``: each sample's bits packed (MSB first) and padded
    with zeros on its own, exactly as :func:`pack_bits` packs one sample. CUDA tensors are packed on
    the device, so only the packed bytes cross to the host (8x less than the bits)."""
    flat = bits.reshape(bits.shape[0], -1)
    if flat.device.type == "cpu":
        return np.packbits(flat.contiguous().numpy(), axis=1)
    n = flat.shape[1]
    pad = -n % 8
    as_bytes = flat.to(torch.uint8)
    if pad:
        as_bytes = torch.nn.functional.pad(as_bytes, (0, pad))
    groups = as_bytes.view(flat.shape[0], -1, 8)
    packed = torch.zeros(groups.shape[:2], dtype=torch.uint8, device=flat.device)
    for j, weight in enumerate(_BIT_WEIGHTS):
        packed |= groups[:, :, j] * weight
    return packed.cpu().numpy()


class BitEncoder:
    """What the edge applies to each head output before it leaves the device."""

    def __init__(self, epsilon: float, seed: int | None = None) -> None:
        self.epsilon = epsilon
        self.generator = make_generator(seed)
        self.rng = make_rng(seed)
        self.threshold = flip_threshold(epsilon)

    def privatize(self, x: torch.Tensor) -> torch.Tensor:
        return randomized_response(binarize(x), self.epsilon, self.generator)

    def randomize_packed(self, packed: np.ndarray, count: int) -> np.ndarray:
        """Randomized response on rows of packed bits (``[B, ceil(count/8)]``, in place). Padding
        bits past ``count`` in each row stay zero."""
        if self.threshold == 0 or packed.size == 0:
            return packed
        mask = flip_mask(self.rng, packed.size, self.threshold).reshape(packed.shape)
        if count % 8:
            mask[:, -1] &= np.uint8((0xFF << (8 - count % 8)) & 0xFF)
        np.bitwise_xor(packed, mask, out=packed)
        return packed

    def encode_packed(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], np.ndarray]:
        """The batch's layout and its privatized features as uint8 ``[B, sample_bytes]``: row ``b``
        is sample ``b``'s head outputs, each packed and padded to a whole byte, back to back (the
        wire format of ``FeatureBatch.data``). Vectorised over the batch: binarize, pack, then
        randomize in the packed domain."""
        layout: list[FeatureLayout] = []
        rows: list[np.ndarray] = []
        for i, y in outputs.items():
            bits = binarize(y.detach())
            count = math.prod(bits.shape[1:])
            layout.append(FeatureLayout(layer=i, shape=list(bits.shape[1:])))
            rows.append(self.randomize_packed(pack_rows(bits), count))
        data = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
        return layout, data

    def encode(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], list[bytes]]:
        """The batch's layout and, per sample, its head outputs packed back to back."""
        layout, data = self.encode_packed(outputs)
        return layout, [row.tobytes() for row in data]


def decode_features(layout: list[FeatureLayout], data: bytes, bits: int = 1) -> dict[int, torch.Tensor]:
    """Cloud side: one sample's packed bytes back to 0/1 float tensors keyed by layer index."""
    return {i: y[0] for i, y in decode_rows(layout, np.frombuffer(data, np.uint8)[None], bits).items()}


def decode_rows(layout: list[FeatureLayout], rows: np.ndarray, bits: int = 1) -> dict[int, torch.Tensor]:
    """A batch's packed features (uint8 ``[B, sample_bytes]``, one sample per row) to float
    ``[B, *shape]`` per layer, unpacked in one vectorised call per layer."""
    if bits != 1:
        raise ProtocolError(f"{bits}-bit features are not supported by this decoder")
    sizes = packed_size(layout, bits)
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ProtocolError(f"sample has {rows.shape[-1]} bytes of features, layout needs {sum(sizes)}")
    out = {}
    offset = 0
    for f, size in zip(layout, sizes, strict=True):
        count = math.prod(f.shape)
        flat = np.unpackbits(rows[:, offset : offset + size], axis=1, count=count)
        out[f.layer] = torch.from_numpy(flat.reshape(len(rows), *f.shape)).float()
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
