"""Progress of long local work (training epochs, dataset passes): a bar on a terminal, plain lines
in a log.

With stderr a terminal, a rich progress bar; otherwise (CI, ``docker logs``, a pipe) one plain log
line per epoch, so a run that nobody watches still says where it is.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cloud_agent.trainer import EpochResult

log = logging.getLogger("mistnet.progress")


class EpochProgress:
    """Steps within an epoch on a bar; each finished epoch as a line with its losses and metrics."""

    def __init__(self, what: str, epochs: int) -> None:
        self.what = what
        self.epochs = epochs
        self.bar: Progress | None = None
        self.task = None
        if sys.stderr.isatty():
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(f"{what} epoch 1/{epochs}", total=None)

    def __enter__(self) -> EpochProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, epoch: int, step: int, loss: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=f"{self.what} epoch {epoch}/{self.epochs} loss {loss:.4f}",
                            completed=step)  # fmt: skip

    def epoch(self, result: EpochResult) -> None:
        losses = " ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
        metrics = " ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        log.info("%s epoch %d/%d: %s %s (%.0f s)", self.what, result.epoch, self.epochs, losses, metrics,
                 result.seconds)  # fmt: skip
