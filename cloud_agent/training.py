"""Training the tail on the received features: the task and trainer for the job, the epoch loop's
hooks (status, resume, cancel), and the epoch that ships. Rank 0 runs ``Training``; the other
torchrun ranks build their trainer with the same functions (``cloud_agent.worker.run_worker``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file

from cloud_agent.feature_store import open_store, share_features
from cloud_agent.job import Job, Pump
from cloud_agent.spool import FeatureStore, SpoolFeatures
from cloud_agent.status import Status
from cloud_agent.tasks import CloudTask, make_task
from cloud_agent.trainer import (
    BEST_WEIGHTS,
    EpochResult,
    History,
    Samples,
    Selection,
    TrainConfig,
    Trainer,
    save_weights,
    selection_split,
)
from common import constants as C
from common.errors import MistnetError
from common.jobspec import HeadStatistics, JobSpec
from common.protocol import JobPhase
from common.storage import write_atomic

log = logging.getLogger("mistnet.cloud")

# Rank 0's adaptation file, as the other training ranks receive it (``Ranks.share``).
ADAPTATION_KEY = "adaptation"


class Training:
    """Rank 0's training phase; ``pump`` honours operator commands (cancel) between steps."""

    def __init__(self, job: Job, status: Status, pump: Pump) -> None:
        self.job, self.status, self.pump = job, status, pump
        self.history = History()
        self.resumed = False  # whether the first step of this run was seen (and a resume reported)

    def run(self) -> None:
        self.share_features()
        self.share_adaptation()
        self.train()

    def share_features(self) -> None:
        """Put the job's feature store in place (S3 transmitter or ``cloud.feature_store``), once: what
        training ranks on other nodes read (``feature_store.open_store``) instead of this spool."""
        spool = self.job.spool
        if spool.get_meta("feature_store") is not None:
            return
        url = share_features(self.job.spec, spool, self.job.delivered())
        if url is not None:
            spool.set_meta("feature_store", url)

    def share_adaptation(self) -> None:
        """Rank 0, before training: the adaptation to the other ranks, whose nodes may lack this work
        directory (each torchrun attempt has its own store, so every attempt shares it again)."""
        if self.job.ranks is not None and self.job.adaptation_path.exists():
            self.job.ranks.share(ADAPTATION_KEY, self.job.adaptation_path.read_bytes())

    def train(self) -> None:
        job, spec = self.job, self.job.spec
        validation = Path(spec.cloud.validation) if spec.cloud.validation else None
        local_head = spec.model.head_statistics == HeadStatistics.LOCAL
        task = make_task(spec.model.arch, validation, job.image_size, spec.cloud.translate, local_head)
        if spec.cloud.validation is None:
            log.warning(
                "no held-out data (cloud.validation): held-out metrics are not computed, and metrics "
                "on training data are never reported in their place"
            )
        data, selection = training_split(job)
        trainer = make_trainer(job, task, data, selection)
        self.history = History.from_json(job.spool.get_meta("history"))
        if self.history.epochs:
            # A restart: the trainer reloads workdir/state (model, optimizer, step) of the last epoch.
            self.status.last_result = self.history.epochs[-1]
        if not self.history.epochs and spec.cloud.epochs > 0:
            before = task.evaluate(job.model, job.cut, job.privatize, job.device)
            job.spool.set_meta("metrics_before", json.dumps(before))
            log.info("held-out before training: %s", before)
            save_weights(job.model, start_weights(job))  # what a vetoed epoch falls back to
        trainer.fit(self.history, self.on_epoch, self.on_step)
        job.spool.set_meta("history", self.history.to_json())
        chosen = trainer.restore_selected()
        if chosen is not None:
            self.record_selection(chosen, task)
        self.status.set_phase(JobPhase.EVALUATING)

    def on_epoch(self, result: EpochResult) -> None:
        self.status.last_result = result
        self.job.spool.set_meta("history", self.history.to_json())
        log.info(
            "epoch %d/%d loss %s metrics %s (%.1f s, %.1f samples/s)",
            result.epoch,
            self.job.spec.cloud.epochs,
            {k: round(v, 4) for k, v in result.losses.items()},
            result.metrics,
            result.seconds,
            result.images_per_s,
        )
        self.status.publish(force=True)

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        spec = self.job.spec
        if not self.resumed:
            self.resumed = True
            if epoch > 1:
                log.info("job %s: resumed training after epoch %d of %d", spec.name, epoch - 1, spec.cloud.epochs)
                self.status.publish(message=f"resumed training after epoch {epoch - 1}", force=True)
        self.pump(0)  # operator commands (cancel) are honoured mid-epoch
        self.status.publish()

    def record_selection(self, chosen: Selection, task: CloudTask) -> None:
        """The shipped epoch and its held-out metrics (measured now if that epoch was not evaluated)."""
        job = self.job
        evaluated = {e.epoch: e.metrics for e in self.history.epochs if e.metrics}
        before = json.loads(job.spool.get_meta("metrics_before") or "{}")
        after = before if chosen.epoch == 0 else evaluated.get(chosen.epoch)
        if after is None:
            after = task.evaluate(job.model, job.cut, job.privatize, job.device)
        message = held_out_regression(task.headline, chosen.epoch, before, after)
        if message is not None and self.fall_back_to_start():
            message = f"{message}: the checkpoint is the model as it was before training (cloud.held_out_veto)"
            chosen, after = Selection(0, chosen.before, chosen.before, chosen.score_before, chosen.score_before), before
        elif message is not None:
            message += "; fewer bits per activation or a larger epsilon let them see what ships"
        message = message or unchecked_choice(job.spec, chosen.epoch)
        job.spool.set_meta("selection", json.dumps({**chosen.__dict__, "metrics": after}))
        if chosen.epoch == 0 and job.spec.cloud.epochs > 0 and message is None:
            message = (
                "no training epoch beat the starting model on the held-back received samples "
                f"({task.headline} {chosen.score_before or 0.0:.4f}, loss {chosen.before:.4f}): the checkpoint is "
                "the model as it was before training"
            )
        if message is not None:
            log.warning("job %s: %s", job.spec.name, message)
            job.spool.set_meta("message", message)

    def fall_back_to_start(self) -> bool:
        """Ship the model before training in place of the chosen epoch (False: the job does not veto, or
        it began before start weights were kept)."""
        job, start = self.job, start_weights(self.job)
        if not job.spec.cloud.held_out_veto or not start.exists():
            return False
        job.model.load_state_dict(load_file(str(start), device=job.device))
        write_atomic(job.workdir / "state" / BEST_WEIGHTS, start.read_bytes())  # what finish.py ships
        return True


def start_weights(job: Job) -> Path:
    return job.workdir / "state" / "start.safetensors"


def held_out_regression(headline: str, epoch: int, before: dict[str, float], after: dict[str, float]) -> str | None:
    """What to say when the chosen epoch scores below the model before training on the cloud's held-out
    data: the held-back received samples chose it, and a handful of them, or their randomization at a
    small ε, can hide what the deployed model, which reads unrandomized levels, does."""
    if headline not in before or headline not in after or after[headline] >= before[headline]:
        return None
    return (
        f"epoch {epoch}, which the held-back received samples chose, scores {headline} {after[headline]:.4f} on "
        f"the held-out data, below {before[headline]:.4f} before training"
    )


def unchecked_choice(spec: JobSpec, epoch: int) -> str | None:
    """What to say when a trained epoch of a pretrained model ships that nothing checked on clean levels:
    no held-out data, and edges' randomization too strong for the held-back received samples to show
    what ships. (A model trained from scratch has no start worth keeping.)"""
    epsilon = spec.smallest_epsilon
    checked = spec.cloud.validation is not None or epsilon >= C.SELECTION_MIN_EPSILON
    if epoch == 0 or checked or not spec.model.pretrained:
        return None
    return (
        f"epoch {epoch} ships, chosen on held-back received samples randomized at epsilon {epsilon:g}; below "
        f"epsilon {C.SELECTION_MIN_EPSILON:g} such choices were measured to score below the model before "
        "training on clean levels (docs/privacy-utility.md), and this job has no held-out data to check it: "
        "set cloud.validation"
    )


def receive_adaptation(job: Job) -> None:
    """Rank > 0: rank 0's adaptation, written here when this work directory lacks it (another
    node) or holds another job's; a shared work directory is left as it is."""
    data = job.ranks.fetch(ADAPTATION_KEY) if job.ranks is not None else None
    path = job.adaptation_path
    if data is None or (path.exists() and path.read_bytes() == data):
        return
    write_atomic(path, data)
    log.info("rank 0's adaptation written to %s", path)


def training_split(job: Job) -> tuple[Samples, Samples | None]:
    """The received samples to train on, and those held back to choose the epoch that ships."""
    return selection_split(features(job), job.spec.cloud.selection_fraction, job.spec.seed)


def features(job: Job) -> FeatureStore:
    """The spool's samples; on a rank > 0 whose work directory holds none (another node, no
    shared filesystem), the job's feature store, which rank 0 put in place from its spool."""
    if job.ranks is None or job.ranks.rank == 0 or job.training_samples() > 0:
        return SpoolFeatures(job.spool, job.delivered())
    store = open_store(job.spec)
    if store is None:
        raise MistnetError(
            f"rank {job.ranks.rank}: {job.workdir} holds none of the job's samples and the job names no "
            "feature store: share the cloud's work directory or set cloud.feature_store"
        )
    log.info("rank %d: reading the job's samples from its feature store (%d)", job.ranks.rank, len(store))
    return store


def make_trainer(job: Job, task: CloudTask, data: Samples, selection: Samples | None) -> Trainer:
    config, state = train_config(job), job.workdir / "state"
    args = (job.model, job.cut, task, data, config, state, job.privatize, selection)
    return Trainer(*args) if job.ranks is None else job.ranks.trainer(*args)


def train_config(job: Job) -> TrainConfig:
    cloud = job.spec.cloud
    return TrainConfig(
        epochs=cloud.epochs,
        batch_size=cloud.batch_size,
        learning_rate=cloud.learning_rate,
        eval_interval=cloud.eval_interval,
        device=job.device,
        seed=job.spec.seed,
        # The decoder already maps levels to the activations the pretrained statistics describe.
        recalibrate_bn=job.adaptation.decoder is None,
        tail_layers=cloud.tail_layers,
        train_decoder=cloud.train_decoder,
    )
