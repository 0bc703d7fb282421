"""The cloud agent: publishes a job, collects every edge's features, trains the tail, reports.

``CloudAgent.run`` is the job's lifecycle; its phases are in ``offer`` (adapting, offering the job,
collecting the features), ``training`` and ``finish``, over the job's state (``job.Job``) and what
the cloud says about it (``status.Status``). The agent itself is the MQTT side: the broker link and
its inbox.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_agent.collector import Collector
from cloud_agent.finish import Finish
from cloud_agent.job import Job
from cloud_agent.offer import Collection, JobFailed, Offer
from cloud_agent.status import Status
from cloud_agent.training import Training
from common.errors import JobCancelled, ProtocolError
from common.jobspec import JobSpec
from common.protocol import Ack, Control, ControlAction, JobPhase, JobSummary, NodeStatus, Topics, from_json, to_json
from common.transport import BrokerOptions, Inbound, LinkEvent, MqttLink

if TYPE_CHECKING:
    from cloud_agent.distributed import Ranks

log = logging.getLogger("mistnet.cloud")


class CloudAgent:
    def __init__(
        self, spec: JobSpec, broker: BrokerOptions, workdir: Path, device: str = "cpu", ranks: Ranks | None = None
    ) -> None:
        """``ranks``: the training processes when torchrun started this one as rank 0 (docs/deploy.md)."""
        self.spec = spec
        self.job = job = Job.open(spec, workdir, device, ranks)
        self.link = MqttLink(
            broker,
            client_id=f"mistnet-cloud-{spec.name}",
            subscriptions=[Topics.all_features(spec.name), Topics.all_node_status(), Topics.control(spec.name)],
        )
        ref = job.store_ref
        self.collector = Collector(
            job.spool,
            spec.name,
            {e.node: e.batch_size for e in spec.edges},
            self.send_ack,
            fetch=job.fetch_object if job.store else None,
            object_prefix=(lambda node: ref.object_prefix(spec.name, node)) if ref else None,
            pipeline=True,
        )
        self.status = Status(job, self.link, self.collector)
        self.offer = Offer(job, self.link, self.status, self.pump)
        self.collection = Collection(job, self.collector, self.status, self.pump)
        self.training = Training(job, self.status, self.pump)
        self.finish = Finish(job, self.link, self.status, self.offer)

    def run(self) -> JobSummary:
        """The job from where its work directory left it to its end; a failed or cancelled job is
        reported (status, summary), not raised."""
        started = float(self.job.spool.get_meta("started") or time.time())
        self.job.spool.set_meta("started", str(started))
        self.link.connect()
        try:
            self.run_phases()
        except JobFailed as exc:
            self.failed(exc)
        except JobCancelled as exc:
            self.cancelled(exc)
        finally:
            summary = self.close(started)
        return summary

    def run_phases(self) -> None:
        job = self.job
        if job.phase == JobPhase.CANCELLED:
            raise JobCancelled("cancelled earlier")
        self.offer.adapt()
        if job.phase in (JobPhase.PENDING, JobPhase.ADAPTING, JobPhase.COLLECTING):
            self.offer.publish()
            self.collection.run()
        if job.phase == JobPhase.TRAINING:
            self.training.run()
        if job.phase == JobPhase.EVALUATING:
            self.finish.run()

    def failed(self, exc: JobFailed) -> None:
        # Reported, not raised: the retained status and the summary name the missing edges and why.
        log.error("job %s failed: %s", self.spec.name, exc)
        self.job.spool.set_meta("message", str(exc))
        self.status.set_phase(JobPhase.FAILED, str(exc))
        self.offer.withdraw()

    def cancelled(self, exc: JobCancelled) -> None:
        self.job.spool.set_meta("message", str(exc))
        self.offer.cancel()
        self.status.set_phase(JobPhase.CANCELLED, str(exc))

    def close(self, started: float) -> JobSummary:
        """The job's end, whatever it was: the summary, with the link and the spool closed."""
        job = self.job
        if job.ranks is not None:
            job.ranks.release()  # the other ranks stop waiting when this job ends without training
        log.info("job %s: %s", self.spec.name, self.collector.summary())
        if job.phase in (JobPhase.DONE, JobPhase.FAILED, JobPhase.CANCELLED):
            self.finish.clean_up_objects()
        summary = self.status.summary(time.time() - started)
        self.link.close()
        job.spool.close()
        return summary

    # inbox -------------------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> None:
        """Handle what waits in the inbox as one batch of the collector: what its feature messages
        store is committed in one transaction, and their acknowledgements are published after that
        COMMIT. Waits up to ``timeout_s`` for a first message (less when chunks held in memory are
        due to be persisted)."""
        sock = self.link.client.socket()
        if sock is not None and sock is not getattr(self, "_nodelay_socket", None):
            # Acknowledgements are small messages an edge waits for: with Nagle's algorithm one is
            # held back behind the previous small packet until the broker's delayed ACK (~40 ms).
            import socket

            setsockopt = getattr(sock, "setsockopt", None)
            try:
                if setsockopt is not None:
                    setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.debug("TCP_NODELAY not set on the broker connection: %s", exc)
            self._nodelay_socket = sock
        with self.collector.batch():
            self.link.drain(self.dispatch, self.collector.wait_s(timeout_s))

    def dispatch(self, item: Inbound | LinkEvent) -> None:
        if isinstance(item, LinkEvent):
            log.info("broker %s", "connected" if item.connected else f"disconnected ({item.reason})")
            return
        kind = "topic"
        try:
            kind, ids = Topics.parse(item.topic)
            if kind == "features":
                self.collector.on_features(ids["node"], item.payload)
            elif kind == "node_status" and item.payload:
                status = from_json(NodeStatus, item.payload)
                if status.node != ids["node"]:
                    raise ProtocolError(f"status of {status.node!r} on the topic of {ids['node']!r}")
                self.collection.on_node_status(status)
            elif kind == "control" and item.payload:
                control = from_json(Control, item.payload)
                if control.job == self.spec.name and control.action == ControlAction.CANCEL:
                    raise JobCancelled(control.reason or "cancelled by an operator")
        except ProtocolError as exc:
            self.collector.reject(kind, item.topic, exc)

    def send_ack(self, ack: Ack) -> None:
        self.link.publish(Topics.ack(ack.node, ack.job), to_json(ack))
