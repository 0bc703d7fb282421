"""The cloud agent: publishes a job, collects every edge's features, trains the tail, reports.

Its state lives in ``workdir`` (spool, phase, per-epoch training state), so a restarted cloud
picks up where it stopped: spooled features are kept and training resumes after the last
completed epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from cloud_agent import report
from cloud_agent.adaptation import Adaptation, adapt
from cloud_agent.collector import Collector
from cloud_agent.export import export_head
from cloud_agent.feature_store import open_store, share_features, store_options
from cloud_agent.model_io import load_pretrained, save_model
from cloud_agent.spool import FeatureStore, Spool, SpoolFeatures
from cloud_agent.tasks import CloudTask, make_task
from cloud_agent.trainer import (
    EpochResult,
    History,
    Samples,
    Selection,
    TrainConfig,
    Trainer,
    selection_split,
    shipped_weights,
)
from common import constants as C
from common import metrics
from common.errors import MistnetError, ProtocolError, SpecError, TransportError
from common.heads import head_chunks
from common.jobspec import JobSpec, OnTimeout
from common.models.cutdecoder import attach
from common.models.registry import build, default_image_size, input_channels, is_detector
from common.privacy import activation_epsilon, feature_transform, sample_epsilon
from common.protocol import (
    Ack,
    CheckpointAnnouncement,
    Control,
    ControlAction,
    EdgeProgress,
    EdgeSummary,
    FeatureObject,
    JobAssignment,
    JobPhase,
    JobState,
    JobStatus,
    JobSummary,
    ModelRef,
    NodeState,
    NodeStatus,
    ObjectStoreRef,
    OnnxHead,
    PrivacyAccount,
    PrivacyParams,
    Topics,
    finite,
    from_json,
    to_json,
    to_msgpack,
)
from common.split import check_cut, head_activations, head_state_dict, tail_inputs
from common.storage import ObjectStore, S3Options, put_object, split_s3, write_atomic
from common.transport import BrokerOptions, Inbound, LinkEvent, MqttLink
from common.weights import pack_state

if TYPE_CHECKING:
    from cloud_agent.distributed import Ranks

log = logging.getLogger("mistnet.cloud")

# Rank 0's adaptation file, as the other training ranks receive it (``Ranks.share``).
ADAPTATION_KEY = "adaptation"


class JobFailed(MistnetError):
    """The job cannot finish (e.g. too few edges delivered before the timeout)."""


class JobCancelled(MistnetError):
    """An operator cancelled the job (``mistnet job cancel``)."""


class CloudAgent:
    def __init__(
        self, spec: JobSpec, broker: BrokerOptions, workdir: Path, device: str = "cpu", ranks: Ranks | None = None
    ) -> None:
        """``ranks``: the training processes when torchrun started this one as rank 0 (docs/deploy.md)."""
        self.spec = spec
        self.workdir = workdir
        self.device = device
        self.ranks = ranks
        self.cut = spec.cut_layer
        self.spool = Spool(workdir / "spool.sqlite")
        self.model = self.build_model()
        self.adaptation = Adaptation(spec.privacy.bits, {}, None)
        self.onnx: tuple[bytes, OnnxHead] | None = None  # the head for edges without torch, once offered
        self.transform = feature_transform(self.adaptation.encoding())
        self.edge_state: dict[str, NodeStatus] = {}
        self.refused: dict[str, str] = {}  # edges whose policy refused this job: why
        self.activations = self.released_activations()
        self.missing: dict[str, str] = json.loads(self.spool.get_meta("missing") or "{}")
        self.epoch = 0
        self.last_result: EpochResult | None = None
        self._last_status = 0.0
        self.link = MqttLink(
            broker,
            client_id=f"mistnet-cloud-{spec.name}",
            subscriptions=[Topics.all_features(spec.name), Topics.all_node_status(), Topics.control(spec.name)],
        )
        batch_sizes = {e.node: e.batch_size for e in spec.edges}
        self.store_ref, self.store = self.object_store()
        ref = self.store_ref
        self.collector = Collector(
            self.spool,
            spec.name,
            batch_sizes,
            self.send_ack,
            fetch=self.fetch_object if self.store else None,
            object_prefix=(lambda node: ref.object_prefix(spec.name, node)) if ref else None,
            pipeline=True,
        )

    def object_store(self) -> tuple[ObjectStoreRef | None, ObjectStore | None]:
        """The S3 transmitter, when the job names one: what edges are told, and the cloud's client."""
        s3 = self.spec.transmitter.s3
        if s3 is None:
            return None, None
        bucket, prefix = split_s3(s3.bucket_path)
        try:
            ref = ObjectStoreRef(
                bucket=bucket, prefix=prefix.strip("/"), endpoint_url=s3.endpoint_url, region=s3.region
            )
        except ValidationError as exc:
            raise SpecError(
                f"transmitter.s3: {s3.bucket_path!r} is not a usable bucket/prefix ({exc.errors()[0]['msg']})"
            ) from None
        options = self.s3_options()
        assert options is not None
        return ref, ObjectStore(bucket, options)

    def fetch_object(self, claim: FeatureObject) -> bytes:
        assert self.store is not None
        return self.store.get(claim.key, claim.size)

    def build_model(self) -> nn.Module:
        m = self.spec.model
        model = load_pretrained(m.pretrained, m.arch, m.num_classes) if m.pretrained else build(m.arch, m.num_classes)
        check_cut(model, self.cut)
        tail_inputs(model, self.cut)
        return model

    def released_activations(self) -> int:
        """Activations an edge releases per sample: the head's outputs the tail reads, their shapes
        from a skeleton of the model on the meta device (nothing allocated or computed)."""
        with torch.device("meta"):
            skeleton = build(self.spec.model.arch, self.num_classes)
        size = self.image_size
        return head_activations(skeleton, self.cut, (input_channels(self.spec.model.arch), size, size))

    @property
    def phase(self) -> JobPhase:
        return JobPhase(self.spool.get_meta("phase") or JobPhase.PENDING)

    def set_phase(self, phase: JobPhase, message: str = "") -> None:
        self.spool.set_meta("phase", phase.value)
        log.info("job %s: %s %s", self.spec.name, phase.value, message)
        self.publish_status(message=message, force=True)

    # run ---------------------------------------------------------------------------------------

    def run(self) -> JobSummary:
        started = float(self.spool.get_meta("started") or time.time())
        self.spool.set_meta("started", str(started))
        self.link.connect()
        try:
            if self.phase == JobPhase.CANCELLED:
                raise JobCancelled("cancelled earlier")
            self.adapt()
            if self.phase in (JobPhase.PENDING, JobPhase.ADAPTING, JobPhase.COLLECTING):
                self.offer_job()
                self.collect()
            if self.phase == JobPhase.TRAINING:
                self.share_features()
                self.share_adaptation()
                self.train()
            if self.phase == JobPhase.EVALUATING:
                self.finish()
        except JobFailed as exc:
            # Reported, not raised: the retained status and the summary name the missing edges and why.
            log.error("job %s failed: %s", self.spec.name, exc)
            self.spool.set_meta("message", str(exc))
            self.set_phase(JobPhase.FAILED, str(exc))
            self.withdraw_job()
        except JobCancelled as exc:
            self.spool.set_meta("message", str(exc))
            self.cancel_assignments()
            self.set_phase(JobPhase.CANCELLED, str(exc))
        finally:
            if self.ranks is not None:
                self.ranks.release()  # the other ranks stop waiting when this job ends without training
            log.info("job %s: %s", self.spec.name, self.collector.summary())
            if self.phase in (JobPhase.DONE, JobPhase.FAILED, JobPhase.CANCELLED):
                self.clean_up_objects()
            summary = self.summary(time.time() - started)
            self.link.close()
            self.spool.close()
        return summary

    # adapting ----------------------------------------------------------------------------------

    @property
    def adaptation_path(self) -> Path:
        return self.workdir / "adaptation.safetensors"

    def adapt(self) -> None:
        """Thresholds and cut decoder from the public images, computed once per job (a restarted
        cloud reloads them: edges may already be encoding with these thresholds)."""
        spec = self.spec
        if spec.cloud.public is None:
            return
        if self.adaptation_path.exists():
            self.adaptation = Adaptation.load(self.adaptation_path)
        else:
            self.set_phase(JobPhase.ADAPTING, f"adapting to {spec.privacy.bits}-bit features on {spec.cloud.public}")
            self.adaptation = adapt(
                self.model,
                self.cut,
                Path(spec.cloud.public),
                self.image_size,
                sorted({spec.epsilon_for(e.node) for e in spec.edges}),
                spec.privacy.bits,
                spec.calibrated,
                spec.cloud.adapt,
                self.device,
                spec.seed,
                self.adapt_progress,
            )
            self.adaptation.save(self.adaptation_path)
        self.transform = feature_transform(self.adaptation.encoding())
        if self.adaptation.decoder is not None:
            attach(self.model, self.adaptation.decoder.to(self.device))

    def share_adaptation(self) -> None:
        """Rank 0, before training: the adaptation to the other ranks, whose nodes may lack this work
        directory (each torchrun attempt has its own store, so every attempt shares it again)."""
        if self.ranks is not None and self.adaptation_path.exists():
            self.ranks.share(ADAPTATION_KEY, self.adaptation_path.read_bytes())

    def receive_adaptation(self) -> None:
        """Rank > 0: rank 0's adaptation, written here when this work directory lacks it (another
        node) or holds another job's; a shared work directory is left as it is."""
        data = self.ranks.fetch(ADAPTATION_KEY) if self.ranks is not None else None
        path = self.adaptation_path
        if data is None or (path.exists() and path.read_bytes() == data):
            return
        write_atomic(path, data)
        log.info("rank 0's adaptation written to %s", path)

    def adapt_progress(self, message: str) -> None:
        log.info("job %s: %s", self.spec.name, message)
        self.pump(0)  # operator commands (cancel) are honoured while adapting
        self.publish_status(message=message, force=True)

    # collecting --------------------------------------------------------------------------------

    def assignment(self, node: str, head: bytes) -> JobAssignment:
        s = self.spec
        manifest, _ = head_chunks(s.name, head, C.DEFAULT_CHUNK_BYTES)
        return JobAssignment(
            job=s.name,
            node=node,
            model=ModelRef(
                arch=s.model.arch, num_classes=self.num_classes, cut_layer=self.cut, image_size=self.image_size
            ),
            privacy=PrivacyParams(
                epsilon=s.epsilon_for(node), bits=s.privacy.bits, thresholds=self.adaptation.wire_thresholds()
            ),
            dataset=s.edge(node).dataset,
            batch_size=s.edge(node).batch_size,
            head=manifest,
            onnx=self.onnx[1] if self.onnx else None,
            seed=s.seed,
            store=self.store_ref,
        )

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or self.spec.model.num_classes or 0) or (
            80 if is_detector(self.spec.model.arch) else 10
        )

    @property
    def image_size(self) -> int:
        return self.spec.model.image_size or default_image_size(self.spec.model.arch)

    def offer_job(self) -> None:
        """Head weights and assignments, retained so edges that connect later still get them."""
        if self.spool.get_meta("collect_started") is None:
            self.spool.set_meta("collect_started", str(time.time()))
        head = pack_state(head_state_dict(self.model, self.cut))
        _, chunks = head_chunks(self.spec.name, head, C.DEFAULT_CHUNK_BYTES)
        self.onnx = self.export_onnx_head()
        _, graph_chunks = head_chunks(self.spec.name, self.onnx[0], C.DEFAULT_CHUNK_BYTES) if self.onnx else (0, [])
        for edge in self.spec.edges:
            for chunk in chunks:
                self.link.publish(
                    Topics.head_chunk(edge.node, self.spec.name, chunk.seq), to_msgpack(chunk), retain=True
                )
            for chunk in graph_chunks:
                self.link.publish(
                    Topics.onnx_chunk(edge.node, self.spec.name, chunk.seq), to_msgpack(chunk), retain=True
                )
            self.link.publish(
                Topics.job_assignment(edge.node, self.spec.name), to_json(self.assignment(edge.node, head)), retain=True
            )
        self.set_phase(JobPhase.COLLECTING, f"waiting for {len(self.spec.edges)} edge(s)")

    def export_onnx_head(self) -> tuple[bytes, OnnxHead] | None:
        """The head as ONNX for edges that run it without torch; None (and a warning) if it cannot be
        exported: edges with the torch runtime still run the job, onnx ones fail saying why."""
        shape = [input_channels(self.spec.model.arch), self.image_size, self.image_size]
        try:
            blob, outputs = export_head(self.model, self.cut, shape)
        except MistnetError as exc:
            log.warning("job %s: %s; edges with the onnx runtime cannot run it", self.spec.name, exc)
            return None
        manifest, _ = head_chunks(self.spec.name, blob, C.DEFAULT_CHUNK_BYTES)
        return blob, OnnxHead(manifest=manifest, input_shape=shape, outputs=outputs)

    def collect(self) -> None:
        deadline = float(self.spool.get_meta("collect_started") or time.time()) + self.spec.collect.timeout_s
        try:
            while True:
                self.pump(0.5)
                self.publish_status(message=self.collector.store_error)
                pending = [e.node for e in self.spec.edges if not self.spool.counts(e.node).complete]
                if not pending:
                    break
                failed = {n: why for n in pending if (why := self.failure(n))}
                if time.time() > deadline or len(failed) == len(pending):
                    self.collector.close()  # what was verified counts
                    self.give_up_on(pending, failed)
                    break
        finally:
            self.collector.close()
        log.info("job %s collected: %s", self.spec.name, self.collector.summary())
        self.set_phase(JobPhase.TRAINING, f"{self.training_samples()} samples from {len(self.delivered())} edge(s)")

    def give_up_on(self, pending: list[str], failed: dict[str, str]) -> None:
        for node in pending:
            self.missing[node] = failed.get(node) or self.missing_reason(node)
        self.spool.set_meta("missing", json.dumps(self.missing))
        complete = len(self.spec.edges) - len(pending)
        detail = "; ".join(f"{n}: {r}" for n, r in self.missing.items())
        if self.spec.collect.on_timeout == OnTimeout.FAIL or complete < self.spec.collect.min_edges:
            raise JobFailed(
                f"{complete} of {len(self.spec.edges)} edges delivered (need "
                f"{self.spec.collect.min_edges}, on_timeout={self.spec.collect.on_timeout.value}): {detail}"
            )
        log.warning("proceeding without %s", detail)

    def failure(self, node: str) -> str:
        """Why an edge will not deliver whatever the wait: its policy refused the job, or it failed."""
        if node in self.refused:
            return f"refused: {self.refused[node]}"
        seen = self.edge_state.get(node)
        return seen.message if seen is not None and seen.state == NodeState.ERROR else ""

    def missing_reason(self, node: str) -> str:
        """Why an edge did not deliver by the timeout, with the last thing it said about itself."""
        counts = self.spool.counts(node)
        timeout = f"{self.spec.collect.timeout_s:.0f} s"
        if counts.samples + counts.skipped == 0:
            reason = f"no data within {timeout}"
        else:
            reason = f"incomplete: {counts.samples + counts.skipped} of {counts.total} samples within {timeout}"
        seen = self.edge_state.get(node)
        if seen is None:
            return reason + "; never seen on the broker"
        ago = max(0.0, time.time() - seen.time) if seen.time else None
        when = f" {ago:.0f} s ago" if ago is not None else ""
        said = f" ({seen.message})" if seen.message else ""
        if seen.state == NodeState.OFFLINE:
            return reason + f"; went offline{when}{said}"
        return reason + f"; last status {seen.state.value}{when}{said}"

    def delivered(self) -> list[str]:
        return [e.node for e in self.spec.edges if self.spool.counts(e.node).samples > 0]

    def training_samples(self) -> int:
        return sum(self.spool.counts(e.node).samples for e in self.spec.edges)

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
                self.on_node_status(status)
            elif kind == "control" and item.payload:
                control = from_json(Control, item.payload)
                if control.job == self.spec.name and control.action == ControlAction.CANCEL:
                    raise JobCancelled(control.reason or "cancelled by an operator")
        except ProtocolError as exc:
            self.collector.reject(kind, item.topic, exc)

    def on_node_status(self, status: NodeStatus) -> None:
        if status.node not in {e.node for e in self.spec.edges}:
            return
        if status.job not in (None, self.spec.name) and status.state != NodeState.OFFLINE:
            return
        self.edge_state[status.node] = status
        if status.job == self.spec.name and status.state == NodeState.REFUSED:
            self.refused[status.node] = status.message or "by the edge's policy"
        elif status.job == self.spec.name and status.state in (NodeState.READY, NodeState.EXTRACTING):
            self.refused.pop(status.node, None)
        self.collector.on_hello(status)

    def send_ack(self, ack: Ack) -> None:
        self.link.publish(Topics.ack(ack.node, ack.job), to_json(ack))

    # training ----------------------------------------------------------------------------------

    def share_features(self) -> None:
        """Put the job's feature store in place (S3 transmitter or ``cloud.feature_store``), once: what
        training ranks on other nodes read (``feature_store.open_store``) instead of this spool."""
        if self.spool.get_meta("feature_store") is not None:
            return
        url = share_features(self.spec, self.spool, self.delivered())
        if url is not None:
            self.spool.set_meta("feature_store", url)

    def train(self) -> None:
        spec = self.spec
        validation = Path(spec.cloud.validation) if spec.cloud.validation else None
        task = make_task(spec.model.arch, validation, self.image_size, spec.cloud.translate)
        if spec.cloud.validation is None:
            log.warning(
                "no held-out data (cloud.validation): held-out metrics are not computed, and metrics "
                "on training data are never reported in their place"
            )
        data, selection = self.training_split()
        trainer = self.make_trainer(task, data, selection)
        history = History.from_json(self.spool.get_meta("history"))
        if history.epochs:
            # A restart: the trainer reloads workdir/state (model, optimizer, step) of the last epoch.
            self.last_result = history.epochs[-1]
            self.epoch = self.last_result.epoch
        if not history.epochs and spec.cloud.epochs > 0:
            before = task.evaluate(self.model, self.cut, self.privatize, self.device)
            self.spool.set_meta("metrics_before", json.dumps(before))
            log.info("held-out before training: %s", before)

        def on_epoch(result: EpochResult) -> None:
            self.epoch = result.epoch
            self.last_result = result
            self.spool.set_meta("history", history.to_json())
            log.info(
                "epoch %d/%d loss %s metrics %s (%.1f s, %.1f samples/s)",
                result.epoch,
                spec.cloud.epochs,
                {k: round(v, 4) for k, v in result.losses.items()},
                result.metrics,
                result.seconds,
                result.images_per_s,
            )
            self.publish_status(force=True)

        started: list[int] = []

        def on_step(epoch: int, step: int, loss: float) -> None:
            if not started:
                started.append(epoch)
                if epoch > 1:
                    log.info("job %s: resumed training after epoch %d of %d", spec.name, epoch - 1, spec.cloud.epochs)
                    self.publish_status(message=f"resumed training after epoch {epoch - 1}", force=True)
            self.pump(0)  # operator commands (cancel) are honoured mid-epoch
            self.publish_status()

        trainer.fit(history, on_epoch, on_step)
        self.spool.set_meta("history", history.to_json())
        chosen = trainer.restore_selected()
        if chosen is not None:
            self.record_selection(chosen, task, history)
        self.set_phase(JobPhase.EVALUATING)

    def training_split(self) -> tuple[Samples, Samples | None]:
        """The received samples to train on, and those held back to choose the epoch that ships."""
        return selection_split(self.features(), self.spec.cloud.selection_fraction, self.spec.seed)

    def features(self) -> FeatureStore:
        """The spool's samples; on a rank > 0 whose work directory holds none (another node, no
        shared filesystem), the job's feature store, which rank 0 put in place from its spool."""
        if self.ranks is None or self.ranks.rank == 0 or self.training_samples() > 0:
            return SpoolFeatures(self.spool, self.delivered())
        store = open_store(self.spec)
        if store is None:
            raise MistnetError(
                f"rank {self.ranks.rank}: {self.workdir} holds none of the job's samples and the job names no "
                "feature store: share the cloud's work directory or set cloud.feature_store"
            )
        log.info("rank %d: reading the job's samples from its feature store (%d)", self.ranks.rank, len(store))
        return store

    def make_trainer(self, task: CloudTask, data: Samples, selection: Samples | None) -> Trainer:
        config, state = self.train_config(), self.workdir / "state"
        args = (self.model, self.cut, task, data, config, state, self.privatize, selection)
        return Trainer(*args) if self.ranks is None else self.ranks.trainer(*args)

    def train_config(self) -> TrainConfig:
        cloud = self.spec.cloud
        return TrainConfig(
            epochs=cloud.epochs,
            batch_size=cloud.batch_size,
            learning_rate=cloud.learning_rate,
            eval_interval=cloud.eval_interval,
            device=self.device,
            seed=self.spec.seed,
            # The decoder already maps levels to the activations the pretrained statistics describe.
            recalibrate_bn=self.adaptation.decoder is None,
            tail_layers=cloud.tail_layers,
            train_decoder=cloud.train_decoder,
        )

    def record_selection(self, chosen: Selection, task: CloudTask, history: History) -> None:
        """The shipped epoch and its held-out metrics (measured now if that epoch was not evaluated)."""
        evaluated = {e.epoch: e.metrics for e in history.epochs if e.metrics}
        before = json.loads(self.spool.get_meta("metrics_before") or "{}")
        after = before if chosen.epoch == 0 else evaluated.get(chosen.epoch)
        if after is None:
            after = task.evaluate(self.model, self.cut, self.privatize, self.device)
        self.spool.set_meta("selection", json.dumps({**chosen.__dict__, "metrics": after}))
        if chosen.epoch == 0 and self.spec.cloud.epochs > 0:
            message = (
                "no training epoch beat the starting model on the held-back received samples "
                f"(loss {chosen.before:.4f}): the checkpoint is the model as it was before training"
            )
            log.warning("job %s: %s", self.spec.name, message)
            self.spool.set_meta("message", message)

    def privatize(self, features: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Held-out inputs take the deployed path: the job's quantisation, no randomization."""
        return self.transform(features)

    # finishing ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Held-out metrics of the shipped model (the selected epoch's, else the last evaluated) and before."""
        history = History.from_json(self.spool.get_meta("history"))
        with_metrics = [e for e in history.epochs if e.metrics]
        before = json.loads(self.spool.get_meta("metrics_before") or "{}")
        after = with_metrics[-1].metrics if with_metrics else {}
        selection = self.spool.get_meta("selection")
        if selection:
            after = json.loads(selection)["metrics"]
        return {**after, **{f"{k}_before": v for k, v in before.items()}}

    @property
    def selected_epoch(self) -> int | None:
        selection = self.spool.get_meta("selection")
        return int(json.loads(selection)["epoch"]) if selection else None

    def finish(self) -> None:
        url = self.checkpoint_url()
        trained = shipped_weights(self.workdir / "state")
        if trained is not None:  # also after a restart between training and here
            self.model.load_state_dict(load_file(str(trained), device=self.device))
        blob = save_model(
            self.model,
            self.spec,
            self.num_classes,
            self.image_size,
            self.adaptation.encoding(),
            self.workdir / "final.safetensors",
            privacy={node: account.model_dump() for node, account in self.privacy_accounts().items()},
        )
        if url != str(self.workdir / "final.safetensors"):
            put_object(url, blob, self.s3_options())
        self.spool.set_meta("checkpoint", url)
        history = History.from_json(self.spool.get_meta("history"))
        announcement = CheckpointAnnouncement(
            job=self.spec.name,
            epoch=len(history.epochs) if self.selected_epoch is None else self.selected_epoch,
            url=url,
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            metrics=finite(self.metrics()),
            final=True,
        )
        self.link.publish(Topics.checkpoint(self.spec.name), to_json(announcement), retain=True)
        self.withdraw_job()
        self.set_phase(JobPhase.DONE, f"checkpoint {url}")
        report.plot_workdir(self.workdir, self.spool, self.spec.name)

    def checkpoint_url(self) -> str:
        return self.spec.cloud.output or str(self.workdir / "final.safetensors")

    def s3_options(self) -> S3Options | None:
        """The S3 transmitter's settings (its Sedna Secret's keys) over the MISTNET_S3_* environment; None
        without one."""
        return store_options(self.spec) if self.spec.transmitter.s3 is not None else None

    def clean_up_objects(self) -> None:
        """Delete the job's feature objects (``transmitter.s3.cleanup``), whatever became of the job."""
        s3 = self.spec.transmitter.s3
        if self.store is None or self.store_ref is None or s3 is None or not s3.cleanup:
            return
        prefix = self.store_ref.job_prefix(self.spec.name)
        try:
            deleted = self.store.delete_prefix(prefix)
        except TransportError as exc:
            log.warning("feature objects under s3://%s/%s are left behind: %s", self.store.bucket, prefix, exc)
            return
        log.info("deleted %d feature object(s) under s3://%s/%s", deleted, self.store.bucket, prefix)

    def cancel_assignments(self) -> None:
        """Retained cancelled assignments: a running edge stops, a restarting one does not begin."""
        head = pack_state(head_state_dict(self.model, self.cut))
        for edge in self.spec.edges:
            cancelled = self.assignment(edge.node, head).model_copy(update={"state": JobState.CANCELLED})
            self.link.publish(Topics.job_assignment(edge.node, self.spec.name), to_json(cancelled), retain=True)
        self.link.publish(Topics.control(self.spec.name), b"", retain=True)

    def withdraw_job(self) -> None:
        """Clear the retained assignment and head so edges do not pick the job up again."""
        for edge in self.spec.edges:
            self.link.publish(Topics.job_assignment(edge.node, self.spec.name), b"", retain=True)

    # status ------------------------------------------------------------------------------------

    def edges_progress(self) -> dict[str, EdgeProgress]:
        out = {}
        for edge in self.spec.edges:
            counts = self.spool.counts(edge.node)
            seen = self.edge_state.get(edge.node)
            out[edge.node] = EdgeProgress(
                state="complete" if counts.complete else (seen.state.value if seen else "waiting"),
                samples=counts.samples,
                skipped=counts.skipped,
                total=counts.total,
                wire_bytes=counts.wire_bytes,
                missing_reason=self.missing.get(edge.node, ""),
                message=seen.message[:500] if seen else "",
                privacy=self.privacy_account(edge.node),
            )
        return out

    def privacy_account(self, node: str) -> PrivacyAccount:
        """What one edge's features cost in privacy: ε and bits per activation, activations per
        sample, and the per-sample bound by composition (docs/security.md)."""
        eps, bits = self.spec.epsilon_for(node), self.spec.privacy.bits
        return PrivacyAccount(
            epsilon=eps,
            bits=bits,
            activations=self.activations,
            activation_epsilon=activation_epsilon(eps, 2**bits),
            sample_epsilon=sample_epsilon(eps, self.activations, 2**bits),
        )

    def privacy_accounts(self) -> dict[str, PrivacyAccount]:
        return {edge.node: self.privacy_account(edge.node) for edge in self.spec.edges}

    def publish_status(self, message: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < C.STATUS_INTERVAL_S:
            return
        self._last_status = now
        r = self.last_result
        status = JobStatus(
            job=self.spec.name,
            phase=self.phase,
            edges=self.edges_progress(),
            epoch=r.epoch if r else 0,
            epochs=self.spec.cloud.epochs,
            loss=_finite_or_none(sum(r.losses.values())) if r and r.losses else None,
            losses=finite(r.losses) if r else {},
            metrics=finite(self.metrics()),
            checkpoint=self.spool.get_meta("checkpoint"),
            message=message,
            time=time.time(),
        )
        metrics.observe_job(status, self.collector.rejected)
        self.link.publish(Topics.job_status(self.spec.name), to_json(status), retain=True)

    def summary(self, duration_s: float) -> JobSummary:
        edges = {}
        for edge in self.spec.edges:
            counts = self.spool.counts(edge.node)
            edges[edge.node] = EdgeSummary(
                samples=counts.samples,
                skipped=counts.skipped,
                wire_bytes=counts.wire_bytes,
                missing_reason=self.missing.get(edge.node, ""),
                privacy=self.privacy_account(edge.node),
            )
        return JobSummary(
            job=self.spec.name,
            phase=self.phase,
            edges=edges,
            metrics=finite(self.metrics()),
            checkpoint=self.spool.get_meta("checkpoint"),
            duration_s=round(duration_s, 3),
            message=self.spool.get_meta("message") or "",
            selected_epoch=self.selected_epoch,
            world_size=self.ranks.world_size if self.ranks is not None else 1,
        )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
