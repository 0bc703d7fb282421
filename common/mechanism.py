"""The privacy mechanism in numpy alone, as an edge without torch runs it: levels → randomized
response → packed bytes (what each step means is told in :mod:`common.privacy`, which builds its
torch-facing API on this module, so both edge runtimes and the cloud share one implementation).

An activation's level is how many of its channel's thresholds it *exceeds* (``x > t``), compared
in float32 whatever produced the activations.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np

from common.protocol import FeatureLayout, PrivacyParams

# Resolution of the packed-domain flip probability: 1 - p is rounded up to a multiple of 2^-32.
FLIP_PRECISION_BITS = 32
# Below this flip probability randomized response is skipped (epsilon >= ~55: pure binarization).
MIN_FLIP_PROBABILITY = 1e-12


def keep_probability(epsilon: float, levels: int = 2) -> float:
    """Probability that randomized response reports an activation's level truthfully."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if levels < 2:
        raise ValueError(f"randomized response needs at least 2 levels, got {levels}")
    return 1.0 / (1.0 + (levels - 1) * math.exp(-epsilon / 2.0))


def randomized_response_levels(levels: np.ndarray, count: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """K-ary randomized response on uint8 levels (in place): each level is kept with probability
    ``keep_probability(ε, K)`` and otherwise replaced by one of the other ``K - 1``, uniformly."""
    replace_p = 1.0 - keep_probability(epsilon, count)
    if replace_p < MIN_FLIP_PROBABILITY:
        return levels
    replace = rng.random(levels.shape, dtype=np.float32) < replace_p
    shift = rng.integers(1, count, size=int(replace.sum()), dtype=np.uint8)
    levels[replace] = (levels[replace] + shift) % count
    return levels


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels ``[B, n]`` to ``[B, ceil(n·bits/8)]``: each level's ``bits`` low bits, MSB first,
    back to back; for ``bits`` = 1 the same bytes as ``np.packbits``."""
    spread = np.unpackbits(levels[:, :, None], axis=2)[:, :, 8 - bits :]
    return np.packbits(spread.reshape(len(levels), -1), axis=1)


def unpack_levels(rows: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_levels`: ``count`` levels per row."""
    spread = np.unpackbits(rows, axis=1, count=count * bits).reshape(len(rows), count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (spread * weights).sum(axis=2, dtype=np.uint8)


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


def quantize_array(x: np.ndarray, thresholds: np.ndarray | None) -> np.ndarray:
    """Levels (uint8) of a batch ``[B, C, ...]``: how many of its channel's thresholds (``[C, K-1]``)
    each activation exceeds. ``None``: one bit, ``x > 0``."""
    x = np.asarray(x, dtype=np.float32)
    if thresholds is None:
        return (x > 0).view(np.uint8)
    t = np.asarray(thresholds, dtype=np.float32).reshape(thresholds.shape[0], *([1] * (x.ndim - 2)), -1)
    levels = (x > t[..., 0]).view(np.uint8)
    for j in range(1, t.shape[-1]):
        levels = levels + (x > t[..., j]).view(np.uint8)
    return levels


class LevelEncoder:
    """What an edge applies to each head output before it leaves the device, on numpy arrays."""

    def __init__(
        self, epsilon: float, seed: int | None = None, bits: int = 1, thresholds: Mapping[int, np.ndarray] | None = None
    ) -> None:
        if bits > 1 and not thresholds:
            raise ValueError(f"{bits}-bit features need thresholds")
        arrays = {layer: np.asarray(t, dtype=np.float32) for layer, t in (thresholds or {}).items()}
        for layer, t in arrays.items():
            if t.ndim != 2 or t.shape[1] != 2**bits - 1:
                raise ValueError(f"layer {layer}: {bits} bits need [C, {2**bits - 1}] thresholds, got {list(t.shape)}")
        self.epsilon = epsilon
        self.bits = bits
        self.level_thresholds = arrays
        self.rng = make_rng(seed)
        self.threshold = flip_threshold(epsilon)

    def array_levels(self, layer: int, y: np.ndarray) -> np.ndarray:
        """Unrandomized levels of one head output (checks the thresholds fit its channels)."""
        t = self.level_thresholds.get(layer)
        if t is not None and t.shape[0] != y.shape[1]:
            raise ValueError(f"layer {layer} has {y.shape[1]} channels but {t.shape[0]} thresholds")
        if t is None and self.bits > 1:
            raise ValueError(f"no thresholds for head output {layer}")
        return quantize_array(y, t)

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

    def encode_array(self, layer: int, y: np.ndarray) -> np.ndarray:
        """One head output of a batch, privatized and packed: uint8 ``[B, ceil(n·bits/8)]``."""
        count = math.prod(y.shape[1:])
        levels = self.array_levels(layer, y).reshape(len(y), count)
        if self.bits == 1:
            return self.randomize_packed(np.packbits(levels, axis=1), count)
        return pack_levels(randomized_response_levels(levels, 2**self.bits, self.epsilon, self.rng), self.bits)

    def encode_arrays(self, outputs: Mapping[int, np.ndarray]) -> tuple[list[FeatureLayout], np.ndarray]:
        """The batch's layout and its privatized features as uint8 ``[B, sample_bytes]``: row ``b``
        is sample ``b``'s head outputs, each packed and padded to a whole byte, back to back (the
        wire format of ``FeatureBatch.data``). Vectorised over the batch; 1-bit features are
        binarized, packed, then randomized in the packed domain."""
        layout = [FeatureLayout(layer=i, shape=list(y.shape[1:])) for i, y in outputs.items()]
        rows = [self.encode_array(i, y) for i, y in outputs.items()]
        data = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
        return layout, data


def encoder_for(params: PrivacyParams, seed: int | None = None) -> LevelEncoder:
    """The edge's encoder for a job's privacy parameters (thresholds as the cloud calibrated them)."""
    thresholds = {t.layer: np.asarray(t.values, dtype=np.float32) for t in params.thresholds or []}
    return LevelEncoder(params.epsilon, seed, params.bits, thresholds)
