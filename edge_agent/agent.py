"""The edge agent: waits for jobs addressed to its node and streams privatized features.

Everything runs in one loop over the link's inbox; paho's thread only enqueues. A job runs as a
:class:`JobRun` that interleaves extraction with acknowledgement handling, so memory stays bounded
by the send window whatever the dataset size.

The edge owns its privacy: an assignment outside its :class:`~common.policy.EdgePolicy` is refused
before any image is read (status ``refused``, with the reason). Nothing that names its data leaves
it: samples travel by index, and what it publishes about failures is a category, never a path or an
exception text (those stay in its local log).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import constants as C
from common import metrics
from common.datasets.by_arch import open_edge_dataset
from common.errors import DatasetError, JobCancelled, MistnetError, ProtocolError, TransportError
from common.heads import join_head
from common.jobspec import HeadStatistics
from common.mechanism import encoder_for
from common.policy import EdgePolicy
from common.protocol import (
    Ack,
    AckKind,
    FeatureObject,
    JobAssignment,
    JobState,
    NodeState,
    NodeStatus,
    Topics,
    decode_head_chunk,
    encode_batch,
    from_json,
    split_transfer,
    to_json,
)
from common.storage import ObjectStore, S3Options, s3_options
from common.transport import BrokerOptions, Inbound, LinkEvent, MqttLink, Rejections
from edge_agent.extractor import Extractor
from edge_agent.runtime import default_runtime, head_manifest, make_extractor
from edge_agent.sender import SendWindow

log = logging.getLogger("mistnet.edge")

HELLO_EVERY_S = 3.0


@dataclass
class JobRun:
    """Progress of one job on this edge."""

    job: JobAssignment
    extractor: Extractor
    window: SendWindow
    resume: Ack | None = None
    acked: set[int] = field(default_factory=set)
    extracted: int = 0
    skipped: int = 0
    store: ObjectStore | None = None  # the S3 transmitter: transfers go up as objects
    objects: dict[int, tuple[FeatureObject, bytes]] = field(default_factory=dict)  # claims not yet acknowledged
    reupload: dict[int, float] = field(default_factory=dict)  # rejected claims: transfer -> next attempt
    store_delay: float = C.STORE_RETRY_MIN_S

    @property
    def transfers(self) -> int:
        return self.extractor.transfers

    def already_committed(self) -> set[int]:
        assert self.resume is not None
        return set(range(self.resume.next_transfer)) | set(self.resume.committed)

    def acked_samples(self) -> int:
        return sum(len(self.extractor.sample_range(t)) for t in self.acked)

    def complete(self) -> bool:
        return self.window.pending == 0 and len(self.acked) >= self.transfers


class EdgeAgent:
    def __init__(
        self,
        node: str,
        broker: BrokerOptions,
        data: Path | None = None,
        device: str = "cpu",
        once: bool = False,
        rate_limit: float | None = None,
        s3_credentials: Path | None = None,
        runtime: str | None = None,
        policy: EdgePolicy | None = None,
    ) -> None:
        """``s3_credentials``: a KEY=VALUE file with MISTNET_S3_* values (else the environment) for jobs
        with the S3 transmitter; S3 credentials never come over MQTT. ``runtime``: what runs the head,
        ``onnx`` or ``torch`` (default: :func:`~edge_agent.runtime.default_runtime`). ``policy``: the
        limits this edge's owner sets (default: none)."""
        self.node = node
        self.runtime = runtime or default_runtime()
        self.policy = policy or EdgePolicy()
        self.refusal: tuple[str, str] | None = None  # (job, why) of the last assignment refused
        self.s3_credentials = s3_credentials
        self.rate_limit = rate_limit
        self.data = data
        self.device = device
        self.once = once
        self.jobs: dict[str, JobAssignment] = {}
        self.heads: dict[str, dict[int, bytes]] = {}
        self.finished: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.reject = Rejections(log, self.rejected)
        self.active_run: JobRun | None = None
        self._last_status = 0.0
        self.last_status = NodeStatus(node=node, state=NodeState.OFFLINE)
        self.link = MqttLink(
            broker,
            client_id=f"mistnet-edge-{node}",
            subscriptions=[Topics.node_jobs(node), Topics.node_head_form(node, self.runtime), Topics.node_acks(node)],
            will=(Topics.node_status(node), to_json(NodeStatus(node=node, state=NodeState.OFFLINE))),
        )

    # lifecycle ---------------------------------------------------------------------------------

    def serve(self) -> int:
        self.link.connect()
        log.info("edge %s connected to %s; policy: %s", self.node, self.link.options.url, self.policy.describe())
        self.publish_status(NodeState.ONLINE, force=True)
        try:
            while not (self.once and self.finished):
                self.pump(0.5)
                job = self.next_runnable()
                if job is not None:
                    self.run_job(job)
        finally:
            log.info("edge %s stops: %s", self.node, self.reject.summary())
            offline = self.last_status.model_copy(update={"state": NodeState.OFFLINE, "time": time.time()})
            self.link.close(final=(Topics.node_status(self.node), to_json(offline)))
        return 0

    def next_runnable(self) -> JobAssignment | None:
        for name, job in self.jobs.items():
            parts, manifest = self.heads.get(name, {}), head_manifest(self.runtime, job)
            if name in self.finished or job.state != JobState.ACTIVE:
                continue
            if manifest is None:
                return job  # no head this runtime can read: the job fails at once, saying why
            if len(parts) != manifest.chunks:
                continue
            try:
                join_head(manifest, parts)
            except ProtocolError:
                continue  # pieces of an older head: the cloud's republished chunks replace them
            return job
        return None

    # inbox -------------------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> None:
        """Handle every queued message, waiting up to ``timeout_s`` for the first."""
        self.link.drain(self.dispatch, timeout_s)

    def dispatch(self, item: Inbound | LinkEvent) -> None:
        if isinstance(item, LinkEvent):
            self.on_link_event(item)
            return
        kind = "topic"
        try:
            kind, ids = Topics.parse(item.topic)
            if ids.get("node") != self.node:
                raise ProtocolError(f"message for node {ids.get('node')!r} on {item.topic}")
            if kind == "job_assignment":
                self.on_job(ids["job"], item.payload)
            elif kind in ("head_chunk", "onnx_chunk"):
                self.on_head_chunk(ids["job"], item.payload)
            elif kind == "ack":
                self.on_ack(from_json(Ack, item.payload))
            else:
                raise ProtocolError(f"unexpected {kind} message on {item.topic}")
        except ProtocolError as exc:
            self.reject(kind, item.topic, exc)

    def on_link_event(self, event: LinkEvent) -> None:
        if event.connected:
            log.info("connected")
            self.publish_status(self.current_state(), force=True)
            if self.active_run is not None:
                # paho resends what the broker never acknowledged; what it did acknowledge and then
                # lost (a broker restart without persistence) goes again if no ack comes soon.
                self.active_run.window.expedite()
        else:
            log.warning("disconnected (%s); paho reconnects with backoff", event.reason)

    def on_job(self, name: str, payload: bytes) -> None:
        if not payload:
            self.withdraw(name, "job withdrawn by the cloud")
            return
        job = from_json(JobAssignment, payload)
        if job.job != name or job.node != self.node:
            raise ProtocolError(f"job assignment for {job.job}/{job.node} on topic of {name}/{self.node}")
        if job.state == JobState.CANCELLED:
            self.withdraw(name, "job cancelled by the cloud")
        elif violations := self.policy.violations(
            job.model.arch, job.model.cut_layer, job.privacy.epsilon, job.privacy.bits
        ):
            self.refuse(name, "; ".join(violations))
            return
        parts, manifest = self.heads.get(name, {}), head_manifest(self.runtime, job)
        for seq in [s for s in parts if manifest is None or s >= manifest.chunks]:
            del parts[seq]  # a new head with fewer pieces; the others are overwritten as they arrive
        self.jobs[name] = job
        log.info(
            "job %s assigned (%s, cut %d, epsilon %g, %s runtime)",
            name, job.model.arch, job.model.cut_layer, job.privacy.epsilon, self.runtime,
        )

    def refuse(self, name: str, reason: str) -> None:
        """An assignment outside this edge's policy: never run (nor, if running, continued); the
        retained status says ``refused`` and why until another job starts."""
        log.warning("job %s refused: %s", name, reason)
        self.withdraw(name, f"job {name} refused: {reason}")
        self.refusal = (name, reason)
        if self.active_run is None:
            self.publish_status(NodeState.REFUSED, force=True)

    def withdraw(self, name: str, reason: str) -> None:
        self.jobs.pop(name, None)
        self.heads.pop(name, None)
        if self.active_run is not None and self.active_run.job.job == name:
            self.active_run.job = self.active_run.job.model_copy(update={"state": JobState.CANCELLED})
            log.info("%s", reason)

    def on_head_chunk(self, name: str, payload: bytes) -> None:
        if not payload:
            return
        chunk = decode_head_chunk(payload)
        if chunk.job != name:
            raise ProtocolError(f"head chunk {chunk.seq}/{chunk.total} of {chunk.job} on topic of {name}")
        parts = self.heads.setdefault(name, {})
        held = sum(len(p) for seq, p in parts.items() if seq != chunk.seq)
        if held + len(chunk.payload) > C.MAX_HEAD_BYTES:
            raise ProtocolError(f"head chunk {chunk.seq} of {name}: more than {C.MAX_HEAD_BYTES} bytes of head")
        if name not in self.jobs and self.unassigned_head_bytes() + len(chunk.payload) > C.MAX_UNASSIGNED_HEAD_BYTES:
            raise ProtocolError(f"head chunk of unassigned job {name}: the buffer for unassigned heads is full")
        parts[chunk.seq] = chunk.payload

    def unassigned_head_bytes(self) -> int:
        return sum(len(p) for name, parts in self.heads.items() if name not in self.jobs for p in parts.values())

    def on_ack(self, ack: Ack) -> None:
        run = self.active_run
        if run is None or ack.job != run.job.job or ack.node != self.node:
            return
        if ack.kind == AckKind.RESUME:
            streaming = run.resume is not None
            run.resume = ack
            if streaming:
                self.on_cloud_restart(run)
        elif ack.kind == AckKind.REJECTED and ack.transfer is not None and ack.seq is not None:
            if ack.transfer in run.objects and run.window.in_flight(ack.transfer, ack.seq):
                log.warning("cloud rejected object of transfer %d (%s): uploading it again", ack.transfer, ack.reason)
                run.reupload.setdefault(ack.transfer, 0.0)
            else:
                log.info("cloud rejected chunk %d/%d (%s): resending", ack.transfer, ack.seq, ack.reason)
                run.window.resend(ack.transfer, ack.seq)
        elif ack.kind == AckKind.CHUNK and ack.transfer is not None:
            if ack.seq is not None:
                run.window.acknowledge(ack.transfer, ack.seq)
            if ack.transfer_done:
                run.window.forget_transfer(ack.transfer)
                run.acked.add(ack.transfer)
                run.objects.pop(ack.transfer, None)
                run.reupload.pop(ack.transfer, None)

    def on_cloud_restart(self, run: JobRun) -> None:
        """A resume point in mid-stream: the cloud (re)started. Whatever it lists is stored; the rest
        still in flight goes again soon (the broker may have queued it for the cloud, or not)."""
        stored = run.already_committed() & set(range(run.transfers))
        for transfer in stored - run.acked:
            run.window.forget_transfer(transfer)
            run.objects.pop(transfer, None)
            run.reupload.pop(transfer, None)
        run.acked |= stored
        run.window.expedite()
        log.info(
            "cloud resumed job %s holding %d of %d transfers; %d chunk(s) in flight will be resent if not acknowledged",
            run.job.job,
            len(stored),
            run.transfers,
            run.window.pending,
        )

    # job ---------------------------------------------------------------------------------------

    def run_job(self, job: JobAssignment) -> None:
        self.refusal = None
        try:
            self.active_run = self.prepare(job)
            self.stream(self.active_run)
            self.publish_status(NodeState.DONE, force=True)
            log.info(
                "job %s done: %d samples acknowledged, %d skipped, %d bytes, %d chunks resent (%d bytes)",
                job.job,
                self.active_run.acked_samples(),
                self.active_run.skipped,
                self.active_run.window.wire_bytes,
                self.active_run.window.resent,
                self.active_run.window.resent_bytes,
            )
        except JobCancelled:
            refused = self.refusal is not None and self.refusal[0] == job.job
            self.publish_status(NodeState.REFUSED if refused else NodeState.CANCELLED, force=True)
        except MistnetError as exc:
            log.error("job %s failed: %s", job.job, exc)
            self.publish_status(NodeState.ERROR, message=public_error(exc), job=job.job, force=True)
        except Exception:
            log.exception("job %s failed on an internal error", job.job)
            self.publish_status(NodeState.ERROR, message=public_error(None), job=job.job, force=True)
            raise
        finally:
            self.finished.add(job.job)
            self.active_run = None

    def prepare(self, job: JobAssignment) -> JobRun:
        manifest = head_manifest(self.runtime, job)
        head = join_head(manifest, self.heads[job.job]) if manifest is not None else b""
        path = self.data or Path(job.dataset)
        if not path.exists():
            raise DatasetError(f"dataset {path} does not exist on node {self.node}")
        dataset = open_edge_dataset(job.model.arch, path, job.model.image_size)
        encoder = encoder_for(job.privacy)
        if job.model.head_statistics == HeadStatistics.LOCAL and self.runtime == "torch":
            message = f"re-estimating the head's BatchNorm statistics on up to {C.HEAD_STATISTICS_IMAGES} local images"
            self.publish_status(NodeState.EXTRACTING, message=message, job=job.job, force=True)
        extractor = make_extractor(self.runtime, job, head, encoder, dataset, self.device)
        topic = Topics.features(self.node, job.job)
        window = SendWindow(
            lambda payload: self._publish_chunk(topic, payload),
            job.window,
            rate_limit=self.rate_limit,
            connected=lambda: self.link.connected,
        )
        store = None
        if job.store is not None:
            local = s3_options(credentials=self.s3_credentials)
            options = S3Options(
                endpoint_url=local.endpoint_url or job.store.endpoint_url,
                access_key=local.access_key,
                secret_key=local.secret_key,
                region=local.region or job.store.region,
            )
            store = ObjectStore(job.store.bucket, options, attempts=2)
            where = f"s3://{job.store.bucket}/{job.store.object_prefix(job.job, self.node)}"
            log.info("job %s: transfers go to %s", job.job, where)
        return JobRun(job, extractor, window, store=store)

    def _publish_chunk(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload)

    def stream(self, run: JobRun) -> None:
        self.await_resume(run)
        todo = [t for t in range(run.transfers) if t not in run.already_committed()]
        run.acked |= run.already_committed() & set(range(run.transfers))
        log.info(
            "job %s: %d samples in %d transfers, %d already committed",
            run.job.job,
            len(run.extractor.dataset),
            run.transfers,
            run.transfers - len(todo),
        )
        self.publish_status(NodeState.EXTRACTING, force=True)
        for transfer in todo:
            batch = run.extractor.extract(transfer)
            run.extracted += len(batch.ids)
            run.skipped += len(batch.skipped)
            if run.store is not None:
                self.wait_for_room(run)
                run.window.send_object(self.upload(run, transfer, encode_batch(batch)))
            else:
                for chunk in split_transfer(run.job.job, self.node, transfer, encode_batch(batch), run.job.chunk_bytes):
                    self.wait_for_room(run)
                    run.window.send(chunk)
            self.publish_status(NodeState.EXTRACTING)
        while not run.complete():
            self.tick(run)
            if time.monotonic() - self._last_status > C.STATUS_INTERVAL_S:
                self.publish_status(NodeState.EXTRACTING)

    def await_resume(self, run: JobRun) -> None:
        last_hello = 0.0
        while run.resume is None:
            if time.monotonic() - last_hello > HELLO_EVERY_S:
                self.publish_status(NodeState.READY, force=True)
                last_hello = time.monotonic()
            self.tick(run)

    def wait_for_room(self, run: JobRun) -> None:
        while run.window.room <= 0:
            self.tick(run)

    def tick(self, run: JobRun) -> None:
        self.pump(0.2)
        if run.job.state == JobState.CANCELLED:
            raise JobCancelled(run.job.job)
        run.window.resend_overdue()
        self.retry_rejected_objects(run)

    # S3 transmitter ----------------------------------------------------------------------------

    def upload(self, run: JobRun, transfer: int, blob: bytes) -> FeatureObject:
        """Put one transfer in the object store, retrying with backoff (reported in the node's
        status) until it succeeds or the job is cancelled; there is no fallback to MQTT chunks."""
        assert run.store is not None and run.job.store is not None
        digest = hashlib.sha256(blob).digest()
        key = f"{run.job.store.object_prefix(run.job.job, self.node)}{transfer:06d}-{digest.hex()[:16]}.msgpack"
        claim = FeatureObject(
            job=run.job.job, node=self.node, transfer=transfer, key=key, size=len(blob), sha256=digest
        )
        while (delay := self.try_upload(run, claim, blob)) is not None:
            self.wait(run, delay)
        run.objects[transfer] = (claim, blob)
        return claim

    def try_upload(self, run: JobRun, claim: FeatureObject, blob: bytes) -> float | None:
        """None when the object is stored, else how long to wait before the next attempt."""
        assert run.store is not None
        try:
            run.store.put(claim.key, blob)
        except TransportError as exc:
            delay = run.store_delay
            message = f"{exc}; retrying in {delay:.0f} s"
            log.warning("job %s: %s", run.job.job, message)
            self.publish_status(NodeState.EXTRACTING, message=message, force=True)
            run.store_delay = min(delay * 2, C.STORE_RETRY_MAX_S)
            return delay
        if run.store_delay > C.STORE_RETRY_MIN_S:
            log.info("job %s: object store reachable again", run.job.job)
            run.store_delay = C.STORE_RETRY_MIN_S
            self.publish_status(NodeState.EXTRACTING, force=True)
        return None

    def retry_rejected_objects(self, run: JobRun) -> None:
        now = time.monotonic()
        for transfer, due in list(run.reupload.items()):
            if due > now or transfer not in run.objects:
                continue
            claim, blob = run.objects[transfer]
            delay = self.try_upload(run, claim, blob)
            if delay is None:
                del run.reupload[transfer]
                run.window.resend(transfer, 0)
            else:
                run.reupload[transfer] = now + delay

    def wait(self, run: JobRun, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.tick(run)

    # status ------------------------------------------------------------------------------------

    def current_state(self) -> NodeState:
        if self.active_run is not None:
            return NodeState.EXTRACTING
        return NodeState.REFUSED if self.refusal is not None else NodeState.ONLINE

    def publish_status(self, state: NodeState, message: str = "", job: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < C.STATUS_INTERVAL_S:
            return
        self._last_status = now
        run = self.active_run
        if state == NodeState.REFUSED and self.refusal is not None:
            job, message = self.refusal
        status = NodeStatus(
            node=self.node,
            state=state,
            job=job or (run.job.job if run else None),
            total=len(run.extractor.dataset) if run else None,
            extracted=run.extracted if run else 0,
            acked=run.acked_samples() if run else 0,
            skipped=run.skipped if run else 0,
            wire_bytes=run.window.wire_bytes if run else 0,
            resent_chunks=run.window.resent if run else 0,
            resent_bytes=run.window.resent_bytes if run else 0,
            message=message,
            time=time.time(),
        )
        self.last_status = status
        metrics.observe_node(status, self.rejected)
        self.link.publish(Topics.node_status(self.node), to_json(status), retain=True)


def public_error(exc: MistnetError | None) -> str:
    """What a failed job's status says on the broker. The object store's own errors (about the
    cloud's bucket and this edge's credentials) go as they are; anything else may name the edge's
    files, so only its kind goes, and the full text stays in this edge's log."""
    if isinstance(exc, TransportError):
        return str(exc)
    if isinstance(exc, DatasetError):
        return "the dataset cannot be read (details in the edge's log)"
    if exc is None:
        return "internal error (details in the edge's log)"
    return f"{type(exc).__name__} (details in the edge's log)"
