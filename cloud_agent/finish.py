"""After training: the final checkpoint (written, uploaded to S3 when ``cloud.output`` names it),
its announcement to the edges, and the job's feature objects deleted from S3."""

from __future__ import annotations

import hashlib
import logging

from safetensors.torch import load_file

from cloud_agent import report
from cloud_agent.job import Job
from cloud_agent.model_io import save_model
from cloud_agent.offer import Offer
from cloud_agent.status import Status
from cloud_agent.trainer import History, shipped_weights
from common.errors import TransportError
from common.protocol import CheckpointAnnouncement, JobPhase, Topics, finite, to_json
from common.storage import put_object
from common.transport import MqttLink

log = logging.getLogger("mistnet.cloud")


class Finish:
    """The shipped model out of the job; ``offer``'s assignments are withdrawn once it is announced."""

    def __init__(self, job: Job, link: MqttLink, status: Status, offer: Offer) -> None:
        self.job, self.link, self.status, self.offer = job, link, status, offer

    def run(self) -> None:
        job, url = self.job, self.checkpoint_url()
        trained = shipped_weights(job.workdir / "state")
        if trained is not None:  # also after a restart between training and here
            job.model.load_state_dict(load_file(str(trained), device=job.device))
        blob = save_model(
            job.model,
            job.spec,
            job.num_classes,
            job.image_size,
            job.adaptation.encoding(),
            job.workdir / "final.safetensors",
            privacy={node: account.model_dump() for node, account in self.status.privacy_accounts().items()},
        )
        if url != str(job.workdir / "final.safetensors"):
            put_object(url, blob, job.s3_options())
        job.spool.set_meta("checkpoint", url)
        self.announce(url, blob)
        self.offer.withdraw()
        self.status.set_phase(JobPhase.DONE, f"checkpoint {url}")
        report.plot_workdir(job.workdir, job.spool, job.spec.name)

    def announce(self, url: str, blob: bytes) -> None:
        job = self.job
        history = History.from_json(job.spool.get_meta("history"))
        announcement = CheckpointAnnouncement(
            job=job.spec.name,
            epoch=len(history.epochs) if job.selected_epoch is None else job.selected_epoch,
            url=url,
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            metrics=finite(job.metrics()),
            final=True,
        )
        self.link.publish(Topics.checkpoint(job.spec.name), to_json(announcement), retain=True)

    def checkpoint_url(self) -> str:
        return self.job.spec.cloud.output or str(self.job.workdir / "final.safetensors")

    def clean_up_objects(self) -> None:
        """Delete the job's feature objects (``transmitter.s3.cleanup``), whatever became of the job."""
        job, s3 = self.job, self.job.spec.transmitter.s3
        if job.store is None or job.store_ref is None or s3 is None or not s3.cleanup:
            return
        prefix = job.store_ref.job_prefix(job.spec.name)
        try:
            deleted = job.store.delete_prefix(prefix)
        except TransportError as exc:
            log.warning("feature objects under s3://%s/%s are left behind: %s", job.store.bucket, prefix, exc)
            return
        log.info("deleted %d feature object(s) under s3://%s/%s", deleted, job.store.bucket, prefix)
