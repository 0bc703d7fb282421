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

# Resolution of the packed-domain flip probability: 1 - p is rounded up to a multiple of 2^-32, or
# of 2^-64 below FINE_BELOW (never to 0: randomized response is never skipped for a finite ε).
FLIP_PRECISION_BITS = 32
FINE_FLIP_PRECISION_BITS = 64
FINE_BELOW = 2.0**-16
# Float uniforms (torch.rand, numpy's random) are multiples of 2^-24 in float32 and 2^-53 in float64.
FLOAT32_GRID_BITS = 24
FLOAT64_GRID_BITS = 53


def keep_probability(epsilon: float, levels: int = 2) -> float:
    """Probability that randomized response reports an activation's level truthfully."""
    return 1.0 / (1.0 + _others_weight(epsilon, levels))


def flip_probability(epsilon: float, levels: int = 2) -> float:
    """``1 - keep_probability``, computed without cancellation: positive for every finite ε up to
    ~1490 (where ``e^(-ε/2)`` underflows; the rounding of :func:`round_up` still keeps it above 0)."""
    weight = _others_weight(epsilon, levels)
    return weight / (1.0 + weight)


def _others_weight(epsilon: float, levels: int) -> float:
    """``(K - 1) · e^(-ε/2)``: the odds of reporting some other level."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if levels < 2:
        raise ValueError(f"randomized response needs at least 2 levels, got {levels}")
    return (levels - 1) * math.exp(-epsilon / 2.0)


def activation_epsilon(epsilon: float, levels: int = 2) -> float:
    """``ln(p/q)`` of K-ary randomized response, the LDP guarantee of one released activation: ``p`` the
    keep probability, ``q = (1 - p) / (K - 1)`` that of each other level. With :func:`keep_probability`
    ``p/q = e^(ε/2)`` whatever K (tests check it against the mechanism), so this is ``ε/2``: the MistNet
    paper's ε per activation. Computed in closed form, as the ratio underflows for large ε."""
    _others_weight(epsilon, levels)  # the same domain checks as the mechanism
    return epsilon / 2.0


def sample_epsilon(epsilon: float, activations: int, levels: int = 2) -> float:
    """The per-sample bound by sequential composition (MistNet paper, Theorem 4.1): ``r · ln(p/q)``
    for the ``r`` activations one sample releases."""
    return activations * activation_epsilon(epsilon, levels)


def round_up(probability: float, grid_bits: int) -> int:
    """``ceil(probability · 2^grid_bits)`` and at least 1: the numerator, on a grid of 2^-grid_bits, of
    a probability never below the one asked (and never 0)."""
    return max(1, math.ceil(math.ldexp(probability, grid_bits)))


def uniform_cutoff(probability: float) -> tuple[bool, float]:
    """Whether float64 uniforms are needed (below FINE_BELOW; float32 ones resolve only 2^-24), and
    the cutoff ``c`` that a uniform falls below with at least ``probability`` (and never 0): the one
    rounding of both float paths (numpy's here, torch's in :func:`common.privacy.randomized_response`)."""
    fine = probability < FINE_BELOW
    grid = FLOAT64_GRID_BITS if fine else FLOAT32_GRID_BITS
    return fine, math.ldexp(round_up(probability, grid), -grid)


def randomized_response_levels(levels: np.ndarray, count: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """K-ary randomized response on uint8 levels (in place): each level is kept with probability
    ``keep_probability(ε, K)`` and otherwise replaced by one of the other ``K - 1``, uniformly."""
    fine, cutoff = uniform_cutoff(flip_probability(epsilon, count))
    replace = rng.random(levels.shape, dtype=np.float64 if fine else np.float32) < cutoff
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


def flip_precision(epsilon: float) -> int:
    """Bits of the packed path's flip probability: 32, or 64 when it is below FINE_BELOW."""
    return FLIP_PRECISION_BITS if flip_probability(epsilon) >= FINE_BELOW else FINE_FLIP_PRECISION_BITS


def flip_threshold(epsilon: float, precision: int | None = None) -> int:
    """``ceil((1 - p) · 2^precision)``, at least 1: the flip probability as an integer numerator."""
    precision = precision or flip_precision(epsilon)
    return min(round_up(flip_probability(epsilon), precision), (1 << precision) - 1)


def flip_mask(
    rng: np.random.Generator, nbytes: int, threshold: int, precision: int = FLIP_PRECISION_BITS
) -> np.ndarray:
    """``nbytes`` bytes whose bits are independent, each 1 with probability ``threshold / 2^precision``.

    Binary-expansion construction, 64 bits at a time: with ``q = 0.b1 b2 … bk`` in binary, start
    from a uniform random word at the lowest set bit of ``q`` and walk up to ``b1``, OR-ing in a
    fresh uniform word where the bit is 1 and AND-ing one where it is 0. Each step maps a bit's
    probability ``v`` to ``(1 + v) / 2`` or ``v / 2``, which ends at exactly ``q`` for every bit
    position independently. Costs at most ``precision`` random words per 64 output bits, no floats:
    above the highest set bit of ``q`` only AND-ing remains, so a mask already all zeros is final
    (a tiny ``q`` at 64 bits costs about ``log2(bits)`` words, not 64).
    """
    words = -(-nbytes // 8)
    if threshold <= 0 or words == 0:
        return np.zeros(nbytes, np.uint8)
    low = (threshold & -threshold).bit_length() - 1
    top = threshold.bit_length() - 1
    mask: np.ndarray = rng.bit_generator.random_raw(words)
    for i in range(low + 1, precision):
        word = rng.bit_generator.random_raw(words)
        if (threshold >> i) & 1:
            np.bitwise_or(mask, word, out=mask)
        else:
            np.bitwise_and(mask, word, out=mask)
            if i > top and not mask.any():
                break
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
        self.precision = flip_precision(epsilon)
        self.threshold = flip_threshold(epsilon, self.precision)

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
        if packed.size == 0:
            return packed
        mask = flip_mask(self.rng, packed.size, self.threshold, self.precision).reshape(packed.shape)
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
