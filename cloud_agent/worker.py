"""A training rank other than 0 under torchrun (``cloud_agent.distributed``): it trains with rank 0
on the features rank 0 collected, and talks to no broker: it holds the job's state (``job.Job``),
not a cloud agent."""

from __future__ import annotations

import logging
from pathlib import Path

from cloud_agent.distributed import Ranks, TrainingStopped
from cloud_agent.feature_store import store_location
from cloud_agent.job import Job
from cloud_agent.tasks import make_task
from cloud_agent.trainer import History
from cloud_agent.training import make_trainer, receive_adaptation, training_split
from common.errors import MistnetError
from common.jobspec import JobSpec

log = logging.getLogger("mistnet.cloud.distributed")


def run_worker(spec: JobSpec, workdir: Path, ranks: Ranks) -> int:
    """A rank other than 0: waits for rank 0 to start training, then trains with it (no MQTT: rank 0
    alone talks to the broker). Returns the exit status."""
    if not ranks.wait_for_training():
        log.info("rank %d: the job ended without training", ranks.rank)
        return 0
    if not (workdir / "spool.sqlite").exists() and store_location(spec) is None:
        raise MistnetError(
            f"rank {ranks.rank}: {workdir} holds no spool and the job names no feature store: every training "
            "process needs the cloud's work directory (one machine, a shared filesystem) or cloud.feature_store"
        )
    job = Job.open(spec, workdir, ranks.device, ranks)
    try:
        receive_adaptation(job)
        # Rank 0's thresholds and cut decoder.
        if spec.cloud.public is not None and not job.load_adaptation():
            raise MistnetError(f"rank {ranks.rank}: {job.adaptation_path} does not exist (rank 0 writes it)")
        # No held-out data (rank 0 evaluates); the same augmentation as rank 0's.
        task = make_task(spec.model.arch, None, job.image_size, spec.cloud.translate)
        data, _ = training_split(job)
        log.info("rank %d: training on its share of %d samples", ranks.rank, len(data))
        make_trainer(job, task, data, None).fit(History(), lambda _: None)
    except TrainingStopped:
        log.info("rank %d: rank 0 stopped training", ranks.rank)
    finally:
        job.spool.close()
    return 0
