"""Tail training on several processes: PyTorch's DistributedDataParallel under torchrun.

torchrun (or ``mistnet cloud --nproc-per-node N``, which runs torchrun's own launcher) starts one
``mistnet cloud`` per rank. Rank 0 is the cloud agent exactly as without torchrun: it offers the
job, collects the edges' features, publishes status and announces the checkpoint. The other ranks
wait in torchrun's rendezvous store until rank 0 starts training, then train with it: DDP over gloo
(CPU) or NCCL (CUDA). They read rank 0's spool when their node shares its work directory, else the
job's feature store in S3 (``cloud.feature_store``, or the S3 transmitter's objects); rank 0's
adaptation reaches them through the rendezvous store. Every global batch (the
job's ``cloud.batch_size``) is the one a single process would train on, shared out between the
ranks, so N ranks descend the same gradients as one. Rank 0 alone evaluates, selects the epoch,
checkpoints and reports; after torchrun restarts the group it reloads the last epoch's checkpoint
and broadcasts it to the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from cloud_agent.spool import StoredSample
from cloud_agent.tasks import Batch
from cloud_agent.trainer import EpochResult, History, Trainer, batchnorm_layers
from common import constants as C
from common.errors import MistnetError
from common.split import run_tail
from common.storage import write_atomic

log = logging.getLogger("mistnet.cloud.distributed")

# Set by rank 0 in the rendezvous store (one per torchrun attempt): "train" once it trains, "stop"
# when the job ends without (more) training.
TRAINING_KEY = "mistnet/training"
TRAIN, STOP = "train", "stop"
# What rank 0 shares with the other ranks (``Ranks.share``) lives under this prefix.
SHARED_PREFIX = "mistnet/shared/"

OnEpoch = Callable[[EpochResult], None]
OnStep = Callable[[int, int, float], None]  # epoch, step, loss


class TrainingStopped(Exception):
    """Rank 0 left training (an operator cancelled the job): the other ranks stop with it."""


def under_torchrun() -> bool:
    """Whether torchrun (or ``mistnet cloud --nproc-per-node``) started this process as one of its ranks."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Every rank needs a share of every global batch."""
    if batch_size < world_size:
        raise MistnetError(
            f"cloud.batch_size {batch_size} cannot be shared out between {world_size} training processes: "
            "use a batch of at least one sample per process"
        )


@dataclass
class Ranks:
    """This process's place among the training processes, and the store they rendezvoused in."""

    rank: int
    world_size: int
    restart: int  # torchrun's restart count: 0 on the first attempt
    device: str
    store: dist.Store
    announced: bool = False

    @classmethod
    def join(cls, device: str) -> Ranks:
        """The process group of the ranks torchrun started (its environment names them): gloo on
        the CPU, NCCL with one GPU per rank (``cuda:LOCAL_RANK``) on CUDA."""
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = torch.device(device).type == "cuda"
        if cuda:
            if local >= torch.cuda.device_count():
                raise MistnetError(
                    f"rank {rank}: no GPU cuda:{local} ({torch.cuda.device_count()} visible): one process per GPU, "
                    "so --nproc-per-node must not exceed the GPUs of a machine"
                )
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        backend = "nccl" if cuda else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        # torchrun's agent keeps one store across restarts: without a prefix per attempt, a restarted
        # rank can read what the previous attempt left there (peers' addresses, rank 0's go-ahead).
        shared, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"mistnet/attempt-{restart}", shared)
        timeout = timedelta(seconds=C.DDP_TIMEOUT_S)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        log.info("rank %d of %d (%s on %s), torchrun attempt %d", rank, world, backend, device, restart + 1)
        return cls(rank, world, restart, device, store)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def release(self) -> None:
        """Rank 0: the job ends without (more) training, so the ranks still waiting exit."""
        if self.rank == 0 and not self.announced:
            self.announced = True
            try:
                self.store.set(TRAINING_KEY, STOP)
            except dist.DistError as exc:  # torchrun is tearing the group down
                log.debug("the other ranks were not told to stop: %s", exc)

    def share(self, key: str, data: bytes) -> None:
        """Rank 0, before the go-ahead: bytes every rank can read, whatever its node's disk holds.
        Returns once the store holds them: c10d's ``set`` does not wait for the server, and a
        query on the same connection is answered only after the ``set`` before it."""
        self.store.set(SHARED_PREFIX + key, data)  # type: ignore[arg-type]  # c10d takes bytes; its stub says str
        self.store.check([SHARED_PREFIX + key])

    def fetch(self, key: str) -> bytes | None:
        """Rank > 0, after the go-ahead: what rank 0 shared under ``key`` (None: nothing)."""
        full = SHARED_PREFIX + key
        return bytes(self.store.get(full)) if self.store.check([full]) else None

    def wait_for_training(self) -> bool:
        """Rank > 0: waits until rank 0 trains (True) or ends the job without training (False)."""
        while True:
            try:
                self.store.wait([TRAINING_KEY], timedelta(seconds=C.RANK_WAIT_LOG_S))
                return bytes(self.store.get(TRAINING_KEY)) == TRAIN.encode()
            except dist.DistStoreError:
                log.info("rank %d: waiting for rank 0 to collect the edges' features", self.rank)

    def trainer(self, *args: Any) -> DistributedTrainer:
        """This rank's trainer (``args``: a ``Trainer``'s); rank 0 first tells the waiting ranks to
        start theirs."""
        if self.rank == 0:
            self.announced = True
            self.store.set(TRAINING_KEY, TRAIN)
        return DistributedTrainer(self, *args)


class RankBatches(Sampler[list[int]]):
    """This rank's share of every global batch. The global batches are those one process trains on
    (the same seeded permutation, cut every ``batch_size``); rank r takes every ``world``-th sample
    of each, from the r-th. Unlike ``DistributedSampler``, which pads the data with repeats (or
    drops its tail) to give every rank as many samples, every sample is used exactly once per epoch
    and every rank takes as many steps: a last batch too small to give each rank a sample is merged
    into the one before."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int | None) -> None:
        """``seed``: the permutation's (None: the data in order)."""
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed

    def global_batches(self) -> list[list[int]]:
        if self.seed is None:
            order = list(range(self.size))
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            merged = batches[-2] + batches.pop()
            half = len(merged) // 2
            batches[-1:] = [merged[:half], merged[half:]] if half >= self.world else [merged]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        count, last = math.ceil(self.size / self.batch_size), self.size % self.batch_size
        merged = count > 1 and 0 < last < self.world and self.batch_size + last < 2 * self.world
        return count - 1 if merged else count


class Tail(nn.Module):
    """The layers after the cut as one module, which DDP wraps (the head is frozen: DDP skips it)."""

    def __init__(self, model: nn.Module, cut: int) -> None:
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return run_tail(self.model, features, self.cut)


class DistributedTrainer(Trainer):
    """A ``Trainer`` on one rank of several: DDP averages the gradients of the ranks' shares of each
    global batch; rank 0 alone evaluates, scores epochs for selection and writes the checkpoints.
    The tail's BatchNorm statistics follow DDP's default: each rank normalises its own share, and
    the running statistics are rank 0's (re-estimated before epoch 1 as the ranks' average)."""

    def __init__(self, ranks: Ranks, *args: Any) -> None:
        """``args``: a ``Trainer``'s."""
        super().__init__(*args)
        self.ranks = ranks
        check_batch_size(self.config.batch_size, ranks.world_size)
        self.agree_on_samples()
        device_ids = [torch.device(self.config.device).index] if self.device_type == "cuda" else None
        self.ddp = DistributedDataParallel(Tail(self.model, self.cut), device_ids=device_ids)
        self.deferred: Exception | None = None  # what rank 0's step callback raised (a cancel)
        folder = os.environ.get(C.SAMPLE_LOG_ENV)
        self.sample_log = Path(folder) if folder else None
        self.seen: list[tuple[str, int]] = []

    @property
    def is_first(self) -> bool:
        return self.ranks.rank == 0

    def agree_on_samples(self) -> None:
        """Every rank must train on the same samples: rank 0's spool must not have changed after it
        started, and every rank must read it or the feature store rank 0 wrote from it."""
        count = len(self.data)
        span = torch.tensor([count, -count], dtype=torch.int64, device=self.config.device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        most, fewest = int(span[0]), -int(span[1])
        if most != fewest:
            raise MistnetError(
                f"the training processes see {fewest} to {most} samples (rank {self.ranks.rank}: {count}): "
                "every rank must read the same work directory or the job's feature store"
            )
        if 0 < count < self.ranks.world_size:
            raise MistnetError(f"{count} training samples cannot be shared out between {self.ranks.world_size} ranks")

    # data ----------------------------------------------------------------------------------------

    def loader(self, generator: torch.Generator | None, shuffle: bool = True, **options: Any) -> DataLoader[Any]:
        """This rank's share of each global batch, in the order one process would train them."""
        seed = (generator.initial_seed() if generator is not None else 0) if shuffle else None
        batches = RankBatches(len(self.data), self.config.batch_size, self.ranks.rank, self.ranks.world_size, seed)
        return DataLoader(
            cast(Dataset[Any], self.data),
            batch_sampler=batches,
            collate_fn=self.collate,
            pin_memory=self.device_type == "cuda",
            **options,
        )

    def collate(self, samples: list[StoredSample]) -> Batch:
        if self.sample_log is not None:
            self.seen.extend((s.node, s.id) for s in samples)
        return self.task.collate(samples)

    # training ------------------------------------------------------------------------------------

    def fit(self, history: History, on_epoch: OnEpoch, on_step: OnStep | None = None) -> History:
        def step_done(epoch: int, step: int, loss: float) -> None:
            if on_step is None or self.deferred is not None:
                return
            try:
                on_step(epoch, step, loss)
            except Exception as exc:  # e.g. JobCancelled from rank 0's inbox: every rank stops at the next step
                self.deferred = exc

        done = super().fit(history, on_epoch, step_done)
        if self.deferred is not None:
            raise self.deferred
        return done

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss through DDP; the ranks agree on whether to skip the step (a non-finite loss on
        any of them) or to stop (rank 0 was cancelled), so none waits for gradients that never come."""
        loss, parts = self.forward_loss(batch, self.ddp)
        flags = torch.tensor(
            [float(not torch.isfinite(loss.detach())), float(self.deferred is not None)], device=self.config.device
        )
        dist.all_reduce(flags)
        if flags[1] > 0:
            raise self.deferred or TrainingStopped("rank 0 stopped training")
        if flags[0] > 0:
            return loss.detach() * math.nan, parts
        return loss, parts

    def train_epoch(self, loader: DataLoader[Any], epoch: int, on_step: OnStep | None) -> dict[str, float]:
        self.seen.clear()
        losses = super().train_epoch(loader, epoch, on_step)
        if self.sample_log is not None:
            self.write_sample_log(self.sample_log, epoch)
        return losses

    def write_sample_log(self, folder: Path, epoch: int) -> None:
        """The (node, id) of every sample this rank trained on in ``epoch`` (``MISTNET_SAMPLE_LOG``)."""
        record = {"epoch": epoch, "rank": self.ranks.rank, "world_size": self.ranks.world_size,
                  "restart": self.ranks.restart, "samples": self.seen}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"epoch{epoch}-rank{self.ranks.rank}.json", json.dumps(record).encode())

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Each rank re-estimates the statistics on its share; the ranks then take their average."""
        super().recalibrate_batchnorm()
        for m in batchnorm_layers(self.model, self.cut):
            for stats in (m.running_mean, m.running_var):
                if stats is not None:
                    dist.all_reduce(stats)
                    stats.div_(self.ranks.world_size)

    # state: rank 0's -----------------------------------------------------------------------------

    def consider(self, epoch: int) -> tuple[float, float] | None:
        return super().consider(epoch) if self.is_first else None

    def save_state(self, epoch: int) -> None:
        if self.is_first:
            super().save_state(epoch)

    def restore_state(self) -> int:
        """Rank 0 reloads the last epoch's checkpoint (its work directory) and sends it to the others."""
        epoch = super().restore_state() if self.is_first else 0
        counters = torch.tensor([epoch, self.step], dtype=torch.int64, device=self.config.device)
        dist.broadcast(counters, 0)
        epoch, self.step = int(counters[0]), int(counters[1])
        if epoch:
            self.broadcast_state()
        return epoch

    @torch.no_grad()
    def broadcast_state(self) -> None:
        """Weights, BatchNorm statistics, momentum and the gradient scaler from rank 0 to all."""
        for tensor in self.model.state_dict().values():
            dist.broadcast(tensor, 0)
        for p in self.params:
            state = self.optimizer.state[p]
            if state.get("momentum_buffer") is None:  # SGD treats zeros as it treats no buffer
                state["momentum_buffer"] = torch.zeros_like(p)
            dist.broadcast(state["momentum_buffer"], 0)
        if self.amp:
            scaler = self.scaler.state_dict()
            values = torch.tensor([scaler["scale"], scaler["_growth_tracker"]], device=self.config.device)
            dist.broadcast(values, 0)
            self.scaler.load_state_dict({**scaler, "scale": float(values[0]), "_growth_tracker": int(values[1])})

