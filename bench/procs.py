"""The processes the benchmarks start: ``python -m bench.procs KIND [options]``.

Each prints ``ready`` once it is set up (children that take ``--wait-go`` then wait for a line on
stdin, so concurrent children start their timed part together) and, at the end, one JSON object
on its last line. Times are ``time.time()`` so the orchestrator can line up several processes.

- ``bare``: the baseline of the edge benchmark: decode, letterbox and the head's forward pass in
  plain torch (eval, ``no_grad``), batch by batch, nothing else.
- ``cloud``: the real :class:`~cloud_agent.agent.CloudAgent` for a job file, timing each edge
  from its resume acknowledgement to its last committed transfer and counting the feature bytes
  it received; ``--collect-only`` stops after collection, otherwise the whole job runs.
- ``edge``: the real ``mistnet edge`` with the extractor's optimisations switched by ``--opts``
  (to measure what each one is worth end to end).
- ``raw-pub`` / ``raw-sub``: a plain paho QoS 1 publish loop and subscriber (transport baseline).
- ``proto-send`` / ``proto-recv``: the real edge send path (``EdgeAgent.stream``: ``SendWindow``,
  chunking, cloud acknowledgements) over pre-built feature batches, into the real cloud
  (``Collection.run``: ``Collector``, ``Spool``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import runpy
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.protocol import Topics

if TYPE_CHECKING:  # torch is imported where it is used: the transport processes start without it
    import torch

    from bench.instrumented_cloud import BenchCloud


def maxrss() -> int:
    """This process's peak RSS in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ready(wait_go: bool) -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if wait_go:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' on stdin, got {line!r}")


# bare head ---------------------------------------------------------------------------------------


def plain_head(model: torch.nn.Module, cut: int) -> Any:
    """Layers [0, cut) in order, as plain torch would run them; routed heads fall back to run_head."""
    from common.split import layers_of, run_head, sources

    layers = layers_of(model)
    sequential = all(sources(layers[i], i) == [i - 1] for i in range(cut))
    if not sequential:
        return lambda x: run_head(model, x, cut)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for i in range(cut):
            x = layers[i](x)
        return x

    return forward


def cmd_bare(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from common.datasets.by_arch import open_edge_dataset
    from common.models.registry import build
    from edge_agent.torch_head import TorchExtractor, check_device

    device = check_device(args.device)
    model = build(args.arch, args.num_classes).eval()
    dataset = open_edge_dataset(args.arch, Path(args.data), args.imgsz)
    if args.optimised:
        from common.privacy import BitEncoder

        extractor = TorchExtractor(model, args.cut, BitEncoder(100.0), dataset, args.batch, device)
        head = extractor.head
        first_image = dataset.load(0).image
        step = extractor.step_for(first_image) if first_image is not None else args.batch
    else:
        model.to(device)
        head = plain_head(model, args.cut)
        step = args.batch
    ready(args.wait_go)
    cuda = torch.device(device).type == "cuda"
    t0 = time.time()
    images = 0
    with torch.no_grad():
        for start in range(0, len(dataset), args.batch):
            stop = min(start + args.batch, len(dataset))
            for first in range(start, stop, step):  # the prepared head runs the extractor's micro-batches
                samples = [dataset.load(i) for i in range(first, min(first + step, stop))]
                x = torch.from_numpy(np.stack([s.image for s in samples if s.image is not None])).to(device)
                head(x)
                if cuda:
                    torch.cuda.synchronize()
                images += len(x)
    t1 = time.time()
    emit({"t_start": t0, "t_end": t1, "images": images, "maxrss": maxrss(), "threads": torch.get_num_threads()})
    return 0


# cloud -------------------------------------------------------------------------------------------


def cmd_cloud(args: argparse.Namespace) -> int:
    from bench.instrumented_cloud import BenchCloud
    from common.jobspec import load_job
    from common.transport import BrokerOptions

    spec = load_job(Path(args.job))
    agent = BenchCloud(spec, BrokerOptions(url=args.broker), Path(args.workdir), args.device, hold=args.hold)
    profile = cProfile.Profile() if args.profile else None
    if args.collect_only:
        result = collect_only(agent, args.online_timeout, profile)
    else:
        ready(False)
        t0 = time.time()
        if profile:
            profile.enable()
        summary = agent.run()  # closes the link and the spool
        if profile:
            profile.disable()
        result = dict(t_offer=t0, t_collected=time.time(), phase=summary.phase.value, metrics=summary.metrics)
        from cloud_agent.spool import Spool

        agent.job.spool = Spool(Path(args.workdir) / "spool.sqlite")
    if profile:
        profile.dump_stats(args.profile)
    edges = {edge.node: edge_counts(agent, edge.node) for edge in spec.edges}
    agent.job.spool.close()
    result.update(edges=edges, duplicates=agent.collector.duplicates, maxrss=maxrss())
    emit(result)
    return 0


def collect_only(agent: BenchCloud, online_timeout: float, profile: cProfile.Profile | None) -> dict[str, Any]:
    """Offer the job once every edge is online and stop after collection (profiled when asked)."""
    agent.link.connect()
    try:
        agent.wait_online(online_timeout)
        ready(False)
        t0 = time.time()
        if profile:
            profile.enable()
        agent.offer.publish()
        agent.collection.run()
        if profile:
            profile.disable()
        t1 = time.time()
        agent.offer.withdraw()
        return dict(t_offer=t0, t_collected=t1, phase=agent.job.phase.value)
    finally:
        agent.link.close()


def edge_counts(agent: BenchCloud, node: str) -> dict[str, Any]:
    """What the cloud timed, received and spooled from one edge."""
    counts = agent.job.spool.counts(node)
    row = agent.job.spool.db.execute(
        "SELECT COALESCE(AVG(COALESCE(length, LENGTH(features))), 0) FROM samples WHERE node=?", (node,)
    ).fetchone()
    return {
        "t_start": agent.t_start.get(node),
        "t_end": agent.t_end.get(node),
        "samples": counts.samples,
        "skipped": counts.skipped,
        "messages": agent.messages[node],
        "payload_bytes": agent.payload_bytes[node],
        "packet_bytes": agent.packet_bytes[node],
        "spooled_wire_bytes": counts.wire_bytes,
        "feature_bytes_per_sample": float(row[0]),
    }


# edge with switched optimisations ------------------------------------------------------------------


def legacy_features(self: Any, good: list[Any]) -> tuple[list[Any], Any]:
    """The extractor's encode path before the optimisation: the batch privatized with torch's
    ``rand`` (a float per activation), then each sample packed on its own."""
    import numpy as np
    import torch

    from common.privacy import pack_bits
    from common.protocol import FeatureLayout
    from common.split import run_head

    x = torch.from_numpy(np.stack([s.image for s in good if s.image is not None])).to(self.device)
    with torch.inference_mode():
        outputs = run_head(self.model, x, self.cut)
    per_layer = {i: self.encoder.privatize(y.detach().cpu()) for i, y in outputs.items()}
    layout = [FeatureLayout(layer=i, shape=list(bits.shape[1:])) for i, bits in per_layer.items()]
    batch = next(iter(per_layer.values())).shape[0]
    data = b"".join(b"".join(pack_bits(bits[b]) for bits in per_layer.values()) for b in range(batch))
    return layout, np.frombuffer(data, np.uint8).reshape(batch, -1)


def apply_extractor_opts(opts: str) -> dict[str, Any]:
    """``fuse_bn=0,channels_last=0,release_tail=0,prefetch=1,encoder=legacy`` onto the torch extractor."""
    from edge_agent.torch_head import TorchExtractor as Extractor

    applied: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key == "encoder":
            if value == "legacy":
                Extractor._features = legacy_features  # type: ignore[method-assign]
            applied[key] = value
            continue
        if not hasattr(Extractor, key):
            raise SystemExit(f"unknown extractor option {key!r}")
        parsed: bool | int | None = None if value in ("", "auto", "none") else value in ("1", "true", "yes")
        if value.isdigit() and len(value) > 1:
            parsed = int(value)
        setattr(Extractor, key, parsed)
        applied[key] = parsed
    return applied


def cmd_edge(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """``python -m mistnet REST`` run in this process, so that it uses the extractor just patched
    (run as a program, like a child process would: bench builds on the CLI's layers, not on the CLI)."""
    apply_extractor_opts(args.opts)
    sys.argv = ["mistnet", *rest]
    try:
        runpy.run_module("mistnet", run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # mistnet/__main__.py ends with sys.exit(main())
        return int(exc.code or 0)
    return 0


# transport ---------------------------------------------------------------------------------------


def raw_client(url: str, client_id: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from common.transport import BrokerOptions

    _, host, port, _ = BrokerOptions(url=url).parsed
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    return client, host, port


def cmd_raw_sub(args: argparse.Namespace) -> int:
    client, host, port = raw_client(args.broker, f"bench-raw-sub-{os.getpid()}")
    subscribed = threading.Event()
    done = threading.Event()
    state = {"count": 0, "bytes": 0, "t_first": 0.0, "t_last": 0.0}

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe(args.topic, qos=1)

    def on_subscribe(c: Any, u: Any, mid: Any, reasons: Any, props: Any) -> None:
        subscribed.set()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if state["count"] == 0:
            state["t_first"] = time.time()
        state["count"] += 1
        state["bytes"] += len(msg.payload)
        if state["count"] >= args.count and not done.is_set():
            state["t_last"] = time.time()
            c.publish(args.done_topic, b"done", qos=1)
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(30):
        raise SystemExit("no SUBACK within 30 s")
    ready(False)
    if not done.wait(args.timeout):
        emit({"received": state["count"], "bytes": state["bytes"], "complete": False})
        return 1
    time.sleep(0.2)  # let the done message's PUBACK through
    client.disconnect()
    client.loop_stop()
    emit(
        {
            "received": state["count"],
            "bytes": state["bytes"],
            "t_first": state["t_first"],
            "t_last": state["t_last"],
            "complete": True,
            "maxrss": maxrss(),
        }
    )
    return 0


def cmd_raw_pub(args: argparse.Namespace) -> int:
    client, host, port = raw_client(args.broker, f"bench-raw-pub-{os.getpid()}")
    client.max_inflight_messages_set(args.inflight)
    subscribed = threading.Event()
    done = threading.Event()
    t_done = [0.0]

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe(args.done_topic, qos=1)

    def on_subscribe(c: Any, u: Any, mid: Any, reasons: Any, props: Any) -> None:
        subscribed.set()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        t_done[0] = time.time()
        done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(30):
        raise SystemExit("no SUBACK within 30 s")
    payload = os.urandom(args.size)
    ready(args.wait_go)
    t0 = time.time()
    for _ in range(args.count):
        client.publish(args.topic, payload, qos=1)
    t_queued = time.time()
    ok = done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    emit(
        {
            "t_start": t0,
            "t_queued": t_queued,
            "t_end": t_done[0],
            "complete": ok,
            "messages": args.count,
            "bytes": args.count * args.size,
            "maxrss": maxrss(),
        }
    )
    return 0 if ok else 1


class SyntheticExtractor:
    """Pre-built feature batches in place of the head: what ``EdgeAgent.stream`` sends, minus the
    model, so the transport benchmark measures the protocol alone."""

    def __init__(self, transfers: int, batch: int, sample_bytes: int) -> None:
        from common.protocol import FeatureBatch, FeatureLayout

        self.batch_size = batch
        self.dataset = range(transfers * batch)
        data = os.urandom(batch * sample_bytes)
        layout = [FeatureLayout(layer=3, shape=[sample_bytes * 8])]
        self.batches = [
            FeatureBatch(
                transfer=t,
                bits=1,
                layout=layout,
                ids=list(range(t * batch, (t + 1) * batch)),
                labels=[b""] * batch,
                data=data,
            )
            for t in range(transfers)
        ]

    @property
    def transfers(self) -> int:
        return len(self.batches)

    def sample_range(self, transfer: int) -> range:
        return range(transfer * self.batch_size, (transfer + 1) * self.batch_size)

    def extract(self, transfer: int) -> Any:
        return self.batches[transfer]


def synthetic_assignment(job: str, node: str, batch: int, chunk_bytes: int, window: int) -> Any:
    from common.protocol import HeadManifest, JobAssignment, ModelRef, PrivacyParams

    return JobAssignment(
        job=job,
        node=node,
        model=ModelRef(arch="lenet5", num_classes=10, cut_layer=2),
        privacy=PrivacyParams(epsilon=100.0),
        dataset="synthetic",
        batch_size=batch,
        chunk_bytes=chunk_bytes,
        window=window,
        head=HeadManifest(sha256="0" * 64, size=1, chunks=1),
    )


def cmd_proto_send(args: argparse.Namespace) -> int:
    from common.protocol import NodeState
    from common.transport import BrokerOptions
    from edge_agent.agent import EdgeAgent, JobRun
    from edge_agent.sender import SendWindow

    agent = EdgeAgent(args.node, BrokerOptions(url=args.broker))
    agent.link.connect()
    extractor = SyntheticExtractor(args.transfers, args.batch, args.sample_bytes)
    job = synthetic_assignment(args.job, args.node, args.batch, args.chunk_bytes, args.window)
    topic = Topics.features(args.node, args.job)
    window = SendWindow(lambda payload: agent._publish_chunk(topic, payload), job.window)
    run = JobRun(job, extractor, window)  # type: ignore[arg-type]
    agent.active_run = run
    ready(args.wait_go)
    agent.await_resume(run)
    t0 = time.time()
    agent.stream(run)
    t1 = time.time()
    agent.publish_status(NodeState.DONE, force=True)
    agent.link.close()
    payload = sum(len(b.data) for b in extractor.batches)
    emit(
        {
            "t_start": t0,
            "t_end": t1,
            "feature_bytes": payload,
            "wire_bytes": window.wire_bytes,
            "resent": window.resent,
            "maxrss": maxrss(),
        }
    )
    return 0


def cmd_proto_recv(args: argparse.Namespace) -> int:
    from cloud_agent.agent import CloudAgent
    from cloud_agent.malloc import reuse_large_buffers
    from common.jobspec import CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec
    from common.transport import BrokerOptions

    spec = JobSpec(
        name=args.job,
        model=ModelSpec(arch="lenet5", num_classes=10),
        cut_layer=2,
        edges=[EdgeSpec(node=args.node, dataset="synthetic", batch_size=args.batch)],
        cloud=CloudSpec(epochs=0),
        collect=CollectSpec(timeout_s=args.timeout),
    )
    if not args.default_malloc:  # as `mistnet cloud` does
        reuse_large_buffers()
    agent = CloudAgent(spec, BrokerOptions(url=args.broker), Path(args.workdir))
    for pragma in filter(None, args.spool_pragma.split(",")):  # to measure other spool settings
        agent.job.spool.db.execute(f"PRAGMA {pragma}")
    if args.hold_s is not None:  # how long incomplete transfers stay in memory (0: persist at batch end)
        agent.collector.hold_s = args.hold_s
    if args.max_batch_bytes is not None:  # 1: one batch (transaction, flush) per message
        agent.collector.max_batch_bytes = args.max_batch_bytes
    if args.no_segment_sync:  # segment bytes written before each COMMIT, not fsync'd
        agent.job.spool.segments.sync_writes = False
    if args.no_pipeline:  # each batch's fsync and COMMIT before the next batch is handled
        agent.collector.pipeline = False
    acks: Counter[str] = Counter()
    send = agent.collector.send_ack

    def counted(ack: Any) -> None:
        acks[ack.kind.value] += 1
        send(ack)

    agent.collector.send_ack = counted
    agent.link.connect()
    sock = agent.link.client.socket()
    if args.nagle and sock is not None:  # leave Nagle's algorithm on for the cloud's broker connection
        agent._nodelay_socket = sock
    ready(False)
    agent.collection.run()
    t1 = time.time()
    counts = agent.job.spool.counts(args.node)
    agent.link.close()
    agent.job.spool.close()
    emit(
        {
            "t_end": t1,
            "samples": counts.samples,
            "wire_bytes": counts.wire_bytes,
            "duplicates": agent.collector.duplicates,
            "spilled": agent.collector.spilled,
            "acks": dict(acks),
            "maxrss": maxrss(),
        }
    )
    return 0


# main --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.procs", description=__doc__)
    sub = p.add_subparsers(dest="kind", required=True)
    add_bare_and_cloud(sub)
    e = sub.add_parser("edge")
    e.add_argument("--opts", default="", help="extractor options, e.g. fuse_bn=0,encoder=legacy")
    for name in ("raw-sub", "raw-pub"):
        r = sub.add_parser(name)
        r.add_argument("--broker", required=True)
        r.add_argument("--topic", required=True)
        r.add_argument("--done-topic", required=True)
        r.add_argument("--count", type=int, required=True)
        r.add_argument("--timeout", type=float, default=300.0)
        if name == "raw-pub":
            r.add_argument("--size", type=int, required=True)
            r.add_argument("--inflight", type=int, default=20)
            r.add_argument("--wait-go", action="store_true")
    for name in ("proto-send", "proto-recv"):
        q = sub.add_parser(name)
        q.add_argument("--broker", required=True)
        q.add_argument("--job", required=True)
        q.add_argument("--node", required=True)
        q.add_argument("--batch", type=int, required=True)
        q.add_argument("--timeout", type=float, default=300.0)
        if name == "proto-send":
            q.add_argument("--transfers", type=int, required=True)
            q.add_argument("--sample-bytes", type=int, required=True)
            q.add_argument("--chunk-bytes", type=int, required=True)
            q.add_argument("--window", type=int, required=True)
            q.add_argument("--wait-go", action="store_true")
        else:
            add_proto_recv_flags(q)
    return p


def add_bare_and_cloud(sub: Any) -> None:
    b = sub.add_parser("bare")
    b.add_argument("--arch", required=True)
    b.add_argument("--num-classes", type=int, default=80)
    b.add_argument("--imgsz", type=int, default=640)
    b.add_argument("--cut", type=int, default=4)
    b.add_argument("--data", required=True)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--device", default="cpu")
    b.add_argument("--optimised", action="store_true", help="the extractor's prepared head instead of plain torch")
    b.add_argument("--wait-go", action="store_true")

    c = sub.add_parser("cloud")
    c.add_argument("--job", required=True)
    c.add_argument("--workdir", required=True)
    c.add_argument("--broker", required=True)
    c.add_argument("--device", default="cpu")
    c.add_argument("--collect-only", action="store_true")
    c.add_argument("--hold", action="store_true", help="start all edges together")
    c.add_argument("--online-timeout", type=float, default=120.0)
    c.add_argument("--profile", help="write cProfile stats of offer.publish+collection.run (or the whole job) here")


def add_proto_recv_flags(q: argparse.ArgumentParser) -> None:
    """The receive path's switches that ``bench.experiments`` turns off one at a time."""
    q.add_argument("--workdir", required=True)
    q.add_argument("--spool-pragma", default="", help="e.g. wal_autocheckpoint=16384 (experiments)")
    q.add_argument(
        "--no-segment-sync", action="store_true", help="no fsync of the spool's segment file before each commit"
    )
    q.add_argument("--no-pipeline", action="store_true", help="fsync and COMMIT each batch before handling the next")
    q.add_argument("--nagle", action="store_true", help="no TCP_NODELAY on the cloud's broker connection")
    q.add_argument("--default-malloc", action="store_true", help="glibc's malloc defaults in the cloud")
    hold = "the collector's hold time for incomplete transfers (0: persisted at the batch's end)"
    q.add_argument("--hold-s", type=float, default=None, help=hold)
    q.add_argument(
        "--max-batch-bytes", type=int, default=None,
        help="the collector's batch limit (1 with --hold-s 0: every chunk persisted and "
        "acknowledged on arrival in its own transaction, then copied into samples: the shape of "
        "the receive path before issue #6)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["edge"]:  # the edge CLI configures logging itself
        split = argv.index("--") if "--" in argv else len(argv)
        args = parser().parse_args(argv[:split])
        return cmd_edge(args, argv[split + 1 :])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    handlers = {
        "bare": cmd_bare,
        "cloud": cmd_cloud,
        "raw-sub": cmd_raw_sub,
        "raw-pub": cmd_raw_pub,
        "proto-send": cmd_proto_send,
        "proto-recv": cmd_proto_recv,
    }
    return handlers[args.kind](args)


if __name__ == "__main__":
    sys.exit(main())
