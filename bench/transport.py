"""Transport: feature bytes per second through the protocol, against raw paho on the same broker.

*System*: ``bench.procs proto-send`` runs the real edge send loop (``EdgeAgent.stream``: msgpack
batches cut into sha256-verified chunks, a ``SendWindow`` of unacknowledged chunks, resend timers)
over pre-built batches shaped like yolov5s at 640 px (16 samples of 102,400 bytes), into
``bench.procs proto-recv``, the real cloud loop (``Collection.run``: each inbox drain one batch
of the ``Collector``, transfers assembled in memory, verified whole, their samples written once to
the SQLite spool in one transaction per batch, acknowledged after its COMMIT). The clock runs from
the first chunk to the last transfer's acknowledgement at the edge.

*Baseline*: ``bench.procs raw-pub`` publishes the same number of messages of the chunk size with
QoS 1 as fast as paho takes them (in-flight window 20, paho's default), to ``raw-sub``, which only
counts them and answers the last with a one-byte message; the clock runs from the first publish to
that answer at the publisher.
"""

from __future__ import annotations

import math
from typing import Any

from bench.util import (
    MIB,
    Context,
    RssSampler,
    await_result,
    child_env,
    children,
    median,
    paired_ratio,
    procs_args,
    spawn,
    wait_ready,
)
from common import constants as C
from common.protocol import FeatureBatch, FeatureLayout, encode_batch

SAMPLE_BYTES = 102_400  # yolov5s at 640 px, cut 4: 128 x 80 x 80 bits
BATCH = 16


def transfer_bytes(batch: int = BATCH, sample_bytes: int = SAMPLE_BYTES) -> int:
    """Size of one encoded transfer as the edge sends it (msgpack of a FeatureBatch)."""
    fb = FeatureBatch(
        transfer=0,
        bits=1,
        layout=[FeatureLayout(layer=3, shape=[sample_bytes * 8])],
        ids=list(range(batch)),
        labels=[b""] * batch,
        data=bytes(batch * sample_bytes),
    )
    return len(encode_batch(fb))


def run_raw(ctx: Context, count: int, size: int) -> dict[str, Any]:
    tag = ctx.unique("raw")
    topic, done = f"bench/{tag}/data", f"bench/{tag}/done"
    logdir = ctx.workdir / "logs" / tag
    with children() as started, RssSampler() as rss:
        sub = spawn("raw-sub", procs_args("raw-sub", "--broker", ctx.broker_url, "--topic", topic,
                                          "--done-topic", done, "--count", str(count)), logdir, child_env())
        started.append(sub)
        wait_ready([sub], ctx.timeout("ready"))
        pub = spawn("raw-pub", procs_args("raw-pub", "--broker", ctx.broker_url, "--topic", topic, "--done-topic",
                                          done, "--count", str(count), "--size", str(size), "--wait-go"),
                    logdir, child_env(), stdin=True)
        started.append(pub)
        for k in started:
            rss.watch(k.name, k.pid)
        if ctx.broker_pid:
            rss.watch("broker", ctx.broker_pid)
        wait_ready([pub], ctx.timeout("ready"))
        pub.send("go")
        out = await_result(pub, [sub], ctx.timeout())
        received = sub.result(30)
    seconds = out["t_end"] - out["t_start"]
    return {"mb_per_s": out["bytes"] / seconds / 1e6, "seconds": seconds, "bytes": out["bytes"],
            "received": received["received"], "messages": count,
            "cpu_s": {n: rss.cpu_between(n, out["t_start"], out["t_end"]) for n in ("raw-pub", "raw-sub", "broker")}}


def run_proto(
    ctx: Context,
    transfers: int,
    recv_extra: list[str] | None = None,
    recv_env: dict[str, str] | None = None,
    broker: tuple[str, int | None] | None = None,
    window: int | None = None,
) -> dict[str, Any]:
    """One protocol run; ``recv_extra``/``recv_env``: options and environment of the cloud process,
    ``broker``: (url, pid) of another broker than the context's, ``window``: another window than the
    default (experiments)."""
    tag = ctx.unique("tx")
    node = f"{tag}-edge"
    logdir = ctx.workdir / "logs" / tag
    url, broker_pid = broker or (ctx.broker_url, ctx.broker_pid)
    common = ["--broker", url, "--job", tag, "--node", node, "--batch", str(BATCH)]
    with children() as started, RssSampler() as rss:
        recv = spawn("proto-recv", procs_args("proto-recv", *common, "--workdir", str(ctx.workdir / "cloud" / tag),
                                              *(recv_extra or [])), logdir, {**child_env(), **(recv_env or {})})
        send = spawn("proto-send", procs_args("proto-send", *common, "--transfers", str(transfers),
                                              "--sample-bytes", str(SAMPLE_BYTES),
                                              "--chunk-bytes", str(C.DEFAULT_CHUNK_BYTES),
                                              "--window", str(window or C.DEFAULT_WINDOW_CHUNKS), "--wait-go"),
                     logdir, child_env(), stdin=True)
        started += [recv, send]
        for k in started:
            rss.watch(k.name, k.pid)
        if broker_pid:
            rss.watch("broker", broker_pid)
        wait_ready(started, ctx.timeout("ready"))
        send.send("go")
        out = await_result(send, [recv], ctx.timeout())
        got = recv.result(60)
    seconds = out["t_end"] - out["t_start"]
    moved = transfers * transfer_bytes()
    return {"mb_per_s": moved / seconds / 1e6, "seconds": seconds, "bytes": moved, "samples": got["samples"],
            "wire_bytes": out["wire_bytes"], "resent": out["resent"], "duplicates": got["duplicates"],
            "spilled_chunks": got.get("spilled", 0), "acks": got.get("acks", {}),
            "cpu_s": {n: rss.cpu_between(n, out["t_start"], out["t_end"])
                      for n in ("proto-send", "proto-recv", "broker")}}


def run(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    blob = transfer_bytes()
    transfers = max(1, round(prof.transport_mib * MIB / blob))
    chunks = transfers * math.ceil(blob / C.DEFAULT_CHUNK_BYTES)
    raw: list[dict[str, Any]] = []
    proto: list[dict[str, Any]] = []
    for r in range(prof.transport_repeats):
        raw.append(run_raw(ctx, chunks, C.DEFAULT_CHUNK_BYTES))
        proto.append(run_proto(ctx, transfers))
        ctx.log(f"transport {r + 1}/{prof.transport_repeats}: raw paho {raw[-1]['mb_per_s']:.0f} MB/s, "
                f"protocol {proto[-1]['mb_per_s']:.0f} MB/s")
    raw_rate = [x["mb_per_s"] for x in raw]
    proto_rate = [x["mb_per_s"] for x in proto]
    mb = transfers * blob / 1e6
    return {
        "transfers": transfers,
        "transfer_bytes": blob,
        "chunk_bytes": C.DEFAULT_CHUNK_BYTES,
        "window": C.DEFAULT_WINDOW_CHUNKS,
        "messages": chunks,
        "megabytes": mb,
        "raw_mb_per_s": median(raw_rate),
        "protocol_mb_per_s": median(proto_rate),
        "raw_runs": raw_rate,
        "protocol_runs": proto_rate,
        "transport_ratio": paired_ratio(proto_rate, raw_rate),
        "raw_received_all": all(x["received"] >= x["messages"] for x in raw),
        "protocol_resent_chunks": sum(x["resent"] for x in proto),
        "protocol_spilled_chunks": sum(x["spilled_chunks"] for x in proto),
        "protocol_acks_per_transfer": median([sum(x["acks"].values()) / transfers for x in proto]),
        "cpu_s_per_mb": {
            "raw": {k: median([x["cpu_s"][k] / (x["bytes"] / 1e6) for x in raw]) for k in raw[0]["cpu_s"]},
            "protocol": {k: median([x["cpu_s"][k] / mb for x in proto]) for k in proto[0]["cpu_s"]},
        },
    }
