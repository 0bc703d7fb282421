"""The MistNet privacy mechanism, in one place: activations → levels → randomized response → bytes.

Each activation becomes one of ``K = 2^bits`` levels: the number of its channel's thresholds it
exceeds (1 bit without thresholds: ``x > 0``, the reference system's binarization; thresholds are
calibrated by the cloud on public data, see :func:`calibrate_thresholds`). Each level is then
reported truthfully with probability ``p = e^(ε/2) / (e^(ε/2) + K - 1)`` and otherwise replaced by
one of the other ``K - 1`` levels, uniformly (K-ary randomized response, which is ε/2-LDP per
activation; for K = 2 it is the symmetric bit flip). ``ε`` is the budget per activation as the
reference implementation defines it (the MistNet paper's ε is half of it), whatever ``bits`` is:
more bits per activation buy resolution, not privacy, and at the same ε each level is kept less
often. Levels are packed ``bits`` per activation, MSB first, so a sample costs
``ceil(C·H·W·bits / 8)`` bytes on the wire.

The 1-bit hot path (:meth:`BitEncoder.encode_packed`) never materialises a float or bool mask of
random numbers: it packs the activation bits first and then flips them in the packed domain with
a mask whose bits are independent Bernoulli(1 - p) draws built from 64-bit random words
(:func:`flip_mask`). That is the same mechanism as :func:`randomized_response`, 7-9x
cheaper.

Randomized response never applies less noise than asked, for any finite ε: every path rounds the
flip (or replacement) probability *up* to the resolution of its random numbers, and never to 0.
The packed path resolves 2^-32, or 2^-64 for probabilities below 2^-16 (ε above ~22 at one bit),
so rounding adds at most 2^-16 of relative noise down to 2^-48 and a flip probability is never
below 2^-64: at ε = 100 (asked: 2·10^-22) a bit flips with probability 2^-64 ≈ 5·10^-20, which in
practice leaves the bits equal to the clean ones. The float paths (:func:`randomized_response`,
:func:`randomized_response_levels`) draw float32 uniforms (multiples of 2^-24), or float64 ones
(2^-53) below 2^-16. Rounding up only lowers ``ln(p/q)``, so the accounting of
:func:`activation_epsilon` stays a valid bound.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from common.errors import ProtocolError
from common.protocol import FeatureLayout, PrivacyParams, packed_size

# Resolution of the packed-domain flip probability: 1 - p is rounded up to a multiple of 2^-32, or
# of 2^-64 below FINE_BELOW (never to 0: randomized response is never skipped for a finite ε).
FLIP_PRECISION_BITS = 32
FINE_FLIP_PRECISION_BITS = 64
FINE_BELOW = 2.0**-16
# Float uniforms (torch.rand, numpy's random) are multiples of 2^-24 in float32 and 2^-53 in float64.
FLOAT32_GRID_BITS = 24
FLOAT64_GRID_BITS = 53
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


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


def _uniform_cutoff(probability: float) -> tuple[bool, float]:
    """Whether float64 uniforms are needed (below FINE_BELOW; float32 ones resolve only 2^-24), and
    the cutoff ``c`` that a uniform falls below with at least ``probability`` (and never 0)."""
    fine = probability < FINE_BELOW
    grid = FLOAT64_GRID_BITS if fine else FLOAT32_GRID_BITS
    return fine, math.ldexp(round_up(probability, grid), -grid)


Thresholds = Mapping[int, torch.Tensor]  # head output layer -> [C, 2^bits - 1] ascending per channel


def binarize(x: torch.Tensor, threshold: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bit per activation of a batch ``[B, C, ...]``; a per-channel ``[C]`` threshold broadcasts."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 2)))
    return x > threshold


def quantize(x: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Levels (uint8) of a batch ``[B, C, ...]``: how many of its channel's thresholds (``[C, K-1]``)
    each activation exceeds. ``None``: one bit, ``x > 0``."""
    if thresholds is None:
        return binarize(x).to(torch.uint8)
    if thresholds.shape[1] == 1:
        return binarize(x, thresholds[:, 0]).to(torch.uint8)
    t = thresholds.to(x.device, x.dtype)
    levels = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(t.shape[1]):
        levels += binarize(x, t[:, j]).to(torch.uint8)
    return levels


def calibrate_thresholds(x: torch.Tensor, bits: int, max_samples: int = 1 << 20) -> torch.Tensor:
    """Per-channel thresholds ``[C, 2^bits - 1]`` at the quantiles ``j / 2^bits`` of public
    activations ``[N, C, ...]``: every level is equally likely on data like the public set, so
    each transmitted bit carries as much information as it can (``x > 0`` sends 56% ones at
    YOLOv5n's cut 4, and far more skewed levels at other layers)."""
    levels = 2**bits
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).float()
    stride = max(1, per_channel.shape[1] // max_samples)
    q = torch.arange(1, levels, dtype=torch.float32) / levels
    return torch.quantile(per_channel[:, ::stride], q, dim=1).T.contiguous()


def randomized_response(bits: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each bit independently with probability 1 - p (rounded up to the uniforms' grid)."""
    fine, cutoff = _uniform_cutoff(flip_probability(epsilon))
    dtype = torch.float64 if fine else torch.float32
    flips = torch.rand(bits.shape, generator=generator, device=bits.device, dtype=dtype) < cutoff
    return bits ^ flips


def randomized_response_levels(levels: np.ndarray, count: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """K-ary randomized response on uint8 levels (in place): each level is kept with probability
    ``keep_probability(ε, K)`` and otherwise replaced by one of the other ``K - 1``, uniformly."""
    fine, cutoff = _uniform_cutoff(flip_probability(epsilon, count))
    replace = rng.random(levels.shape, dtype=np.float64 if fine else np.float32) < cutoff
    shift = rng.integers(1, count, size=int(replace.sum()), dtype=np.uint8)
    levels[replace] = (levels[replace] + shift) % count
    return levels


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels ``[B, n]`` to ``[B, ceil(n·bits/8)]``: each level's ``bits`` low bits, MSB first,
    back to back; for ``bits`` = 1 the same bytes as :func:`pack_rows`."""
    spread = np.unpackbits(levels[:, :, None], axis=2)[:, :, 8 - bits :]
    return np.packbits(spread.reshape(len(levels), -1), axis=1)


def unpack_levels(rows: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_levels`: ``count`` levels per row."""
    spread = np.unpackbits(rows, axis=1, count=count * bits).reshape(len(rows), count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (spread * weights).sum(axis=2, dtype=np.uint8)


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

    def __init__(
        self, epsilon: float, seed: int | None = None, bits: int = 1, thresholds: Thresholds | None = None
    ) -> None:
        if bits > 1 and not thresholds:
            raise ValueError(f"{bits}-bit features need thresholds")
        for layer, t in (thresholds or {}).items():
            if t.dim() != 2 or t.shape[1] != 2**bits - 1:
                raise ValueError(f"layer {layer}: {bits} bits need [C, {2**bits - 1}] thresholds, got {list(t.shape)}")
        self.epsilon = epsilon
        self.bits = bits
        self.thresholds = dict(thresholds or {})
        self.generator = make_generator(seed)
        self.rng = make_rng(seed)
        self.precision = flip_precision(epsilon)
        self.threshold = flip_threshold(epsilon, self.precision)

    def levels(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """Unrandomized levels of one head output (checks the thresholds fit its channels)."""
        t = self.thresholds.get(layer)
        if t is not None and t.shape[0] != y.shape[1]:
            raise ValueError(f"layer {layer} has {y.shape[1]} channels but {t.shape[0]} thresholds")
        if t is None and self.bits > 1:
            raise ValueError(f"no thresholds for head output {layer}")
        return quantize(y, t)

    def quantized(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Levels of a batch without randomization, as float ``level / (K - 1)``: the deployed path."""
        return self.levels(layer, x).float() / (2**self.bits - 1)

    def privatize(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Randomized levels of a batch, as float ``level / (K - 1)``: what the cloud's tail reads."""
        levels = self.levels(layer, x).cpu().numpy().reshape(len(x), -1)
        noisy = randomized_response_levels(levels, 2**self.bits, self.epsilon, self.rng)
        return torch.from_numpy(noisy).view(x.shape).float() / (2**self.bits - 1)

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

    def encode_rows(self, layer: int, y: torch.Tensor) -> np.ndarray:
        """One head output of a batch, privatized and packed: uint8 ``[B, ceil(n·bits/8)]``."""
        count = math.prod(y.shape[1:])
        if self.bits == 1:
            return self.randomize_packed(pack_rows(self.levels(layer, y.detach()).bool()), count)
        levels = self.levels(layer, y.detach()).cpu().numpy().reshape(len(y), count)
        return pack_levels(randomized_response_levels(levels, 2**self.bits, self.epsilon, self.rng), self.bits)

    def encode_packed(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], np.ndarray]:
        """The batch's layout and its privatized features as uint8 ``[B, sample_bytes]``: row ``b``
        is sample ``b``'s head outputs, each packed and padded to a whole byte, back to back (the
        wire format of ``FeatureBatch.data``). Vectorised over the batch; 1-bit features are
        binarized, packed, then randomized in the packed domain."""
        layout = [FeatureLayout(layer=i, shape=list(y.shape[1:])) for i, y in outputs.items()]
        rows = [self.encode_rows(i, y) for i, y in outputs.items()]
        data = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
        return layout, data

    def encode(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], list[bytes]]:
        """The batch's layout and, per sample, its head outputs packed back to back."""
        layout, data = self.encode_packed(outputs)
        return layout, [row.tobytes() for row in data]


def encoder_for(params: PrivacyParams, seed: int | None = None) -> BitEncoder:
    """The edge's encoder for a job's privacy parameters (thresholds as the cloud calibrated them)."""
    thresholds = {t.layer: torch.tensor(t.values, dtype=torch.float32) for t in params.thresholds or []}
    return BitEncoder(params.epsilon, seed, params.bits, thresholds)


def decode_features(layout: list[FeatureLayout], data: bytes, bits: int = 1) -> dict[int, torch.Tensor]:
    """Cloud side: one sample's packed bytes back to float ``level / (K - 1)`` tensors keyed by layer."""
    return {i: y[0] for i, y in decode_rows(layout, np.frombuffer(data, np.uint8)[None], bits).items()}


def decode_rows(layout: list[FeatureLayout], rows: np.ndarray, bits: int = 1) -> dict[int, torch.Tensor]:
    """A batch's packed features (uint8 ``[B, sample_bytes]``, one sample per row) to float
    ``[B, *shape]`` per layer holding ``level / (2^bits - 1)`` (0/1 for bits), vectorised."""
    if not 1 <= bits <= 8:
        raise ProtocolError(f"{bits} bits per activation: must be 1..8")
    sizes = packed_size(layout, bits)
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ProtocolError(f"sample has {rows.shape[-1]} bytes of features, layout needs {sum(sizes)}")
    out = {}
    offset = 0
    for f, size in zip(layout, sizes, strict=True):
        count = math.prod(f.shape)
        part = rows[:, offset : offset + size]
        if bits == 1:
            values = torch.from_numpy(np.unpackbits(part, axis=1, count=count)).float()
        else:
            values = torch.from_numpy(unpack_levels(part, count, bits)).float() / (2**bits - 1)
        out[f.layer] = values.view(len(rows), *f.shape)
        offset += size
    return out


def thresholds_from_metadata(metadata: Mapping[str, Any]) -> dict[int, torch.Tensor]:
    """A checkpoint's (or job's) thresholds, ``{"layer": [[t, ...] per channel]}``, as tensors."""
    raw = metadata.get("thresholds") or {}
    return {int(layer): torch.tensor(rows, dtype=torch.float32) for layer, rows in raw.items()}


def thresholds_to_metadata(thresholds: Thresholds) -> dict[str, list[list[float]]]:
    return {str(layer): t.tolist() for layer, t in thresholds.items()}


def feature_transform(
    metadata: Mapping[str, Any], randomize: bool = False
) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]:
    """The deployed path for a MistNet checkpoint: head outputs become the levels its tail was
    trained on (its ``bits`` and ``thresholds``), as the cloud decodes them.

    Randomized response is off by default at inference: it protects data leaving an edge, and a
    model evaluated where the image already is gains no privacy from it.
    """
    bits = int(metadata.get("bits", 1))
    encoder = BitEncoder(
        float(metadata.get("epsilon", 100.0)), bits=bits, thresholds=thresholds_from_metadata(metadata)
    )

    def transform(outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if randomize:
            return {i: encoder.privatize(y, i).to(y.device) for i, y in outputs.items()}
        return {i: encoder.quantized(y, i) for i, y in outputs.items()}

    return transform


def wire_bytes_per_sample(shapes: list[list[int]], bits: int = 1) -> int:
    """ceil(activations · bits / 8) per head output, summed: the payload floor of one sample."""
    return sum(-(-math.prod(s) * bits // 8) for s in shapes)
