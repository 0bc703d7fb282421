"""What an edge reads from its local data: indexed samples with a wire-ready label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Why a sample could not be read, as its ``error`` starts: the only part that leaves the edge.
UNREADABLE_IMAGE = "unreadable image"
BAD_LABELS = "bad label file"
UNREADABLE_SAMPLE = "unreadable sample"
PUBLIC_REASONS = (UNREADABLE_IMAGE, BAD_LABELS)


def public_reason(error: str) -> str:
    """The category of a sample's error (its file name and exception text stay at the edge)."""
    return next((r for r in PUBLIC_REASONS if error.startswith(r)), UNREADABLE_SAMPLE)


@dataclass(frozen=True)
class EdgeSample:
    """One input ready for the head, or the reason it could not be read (``image`` is None).
    ``key`` names the sample (a relative path) in the edge's own log; it never goes on the wire."""

    id: int
    key: str
    image: np.ndarray | None  # float32 CHW, as the head reads it
    label: bytes
    error: str = ""


class EdgeDataset(Protocol):
    """Deterministic order: sample ``id`` is its index, so resume points survive restarts."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> EdgeSample: ...
