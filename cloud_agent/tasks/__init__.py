"""What differs between scenarios on the cloud: batching labels, the loss, and held-out metrics.

The interface every task provides is in :mod:`cloud_agent.tasks.base`; :func:`make_task` picks the job's
task (classification or detection) by model arch.
"""

from __future__ import annotations

from pathlib import Path

from cloud_agent.tasks.base import Batch, CloudTask, Privatize
from cloud_agent.tasks.classification import Classification

__all__ = ["Batch", "CloudTask", "Privatize", "make_task"]


def make_task(
    arch: str, validation: Path | None, image_size: int, translate: int = 0, local_head: bool = False
) -> CloudTask:
    if arch == "lenet5":
        return Classification(validation)
    from cloud_agent.tasks.detection import Detection

    return Detection(validation, image_size, translate, local_head)
