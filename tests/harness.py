"""Helpers of the fault, hostile-input, security, S3 and load tests (real processes, real mosquitto).

- :func:`mnist_base`: the MNIST split and the pretrained LeNet-5, prepared once per test session.
- :func:`write_job`: a job file over that data with the knobs the tests turn.
- :func:`retained`: every retained message under some topic filters (as a late subscriber sees them).
- :class:`RssSampler`: peak resident memory of processes while a test runs.
- ``single_thread`` (autouse where imported): agent processes get ``OMP_NUM_THREADS=1``; on two shared
  cores torch's default thread pool makes a LeNet job ~4x slower, as parallel regions wait for
  threads the OS has descheduled.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.jobspec import (
    CloudSpec,
    CollectSpec,
    EdgeSpec,
    HeadStatistics,
    JobSpec,
    ModelSpec,
    OnTimeout,
    PrivacySpec,
    S3Spec,
    TransmitterSpec,
)
from mistnet.demo import write_job as write_spec


@pytest.fixture(autouse=True)
def single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@dataclass(frozen=True)
class MnistBase:
    root: Path
    weights: Path
    test: Path

    def shard(self, k: int, edges: int = 2) -> Path:
        return self.root / f"data-{edges}" / f"edge{k}.npz"


def mnist_base(factory: pytest.TempPathFactory, edges: Sequence[int] = (2,)) -> MnistBase:
    """Shards for 2 (and any other listed count of) edges plus weights pretrained on the public slice;
    made once per session (the public and test slices do not depend on the edge count)."""
    import torch

    from cloud_agent.pretrain import pretrain_classifier
    from common.datasets.mnist import load_tensors, prepare_mnist
    from common.models.lenet import LeNet5

    root = factory.getbasetemp() / "mnist-base"
    weights = root / "lenet5-pretrained.safetensors"
    for n in edges:
        if not (root / f"data-{n}" / f"edge{n}.npz").exists():
            prepare_mnist(root / f"data-{n}", n)
    if not weights.exists():
        from safetensors.torch import save_file

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            images, labels = load_tensors(root / "data-2" / "public.npz")
            model = LeNet5()
            pretrain_classifier(model, images, labels)
        finally:
            torch.set_num_threads(threads)
        tmp = weights.with_suffix(".tmp")
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp),
            metadata={"mistnet": '{"arch": "lenet5", "num_classes": 10}'},
        )
        tmp.replace(weights)
    return MnistBase(root, weights, root / "data-2" / "test.npz")


def write_job(
    base: MnistBase,
    path: Path,
    *,
    name: str = "mnist-demo",
    nodes: Sequence[str] = ("edge1", "edge2"),
    shards: int = 2,
    epochs: int = 1,
    timeout_s: float = 120,
    on_timeout: str = "proceed",
    min_edges: int = 1,
    s3: S3Spec | None = None,
    output: Path | None = None,
    epsilon: float = 100,
    feature_store: str | None = None,
    head_statistics: HeadStatistics = HeadStatistics.PRETRAINED,
) -> Path:
    """A native job file: node k of ``nodes`` holds shard k of a ``shards``-edge split. The edges keep
    the pretrained head's statistics unless asked: tests compare what they send with levels computed
    here from that head, and the two runtimes' levels with each other (onnx cannot re-estimate them)."""
    spec = JobSpec(
        name=name,
        model=ModelSpec(arch="lenet5", num_classes=10, pretrained=str(base.weights), head_statistics=head_statistics),
        cut_layer=2,
        privacy=PrivacySpec(epsilon=epsilon),
        edges=[
            EdgeSpec(node=node, dataset=str(base.shard(k, shards)), batch_size=64) for k, node in enumerate(nodes, 1)
        ],
        cloud=CloudSpec(
            epochs=epochs,
            batch_size=64,
            learning_rate=0.02,
            validation=str(base.test),
            output=str(output or path.parent / f"{name}.safetensors"),
            feature_store=feature_store,
        ),
        collect=CollectSpec(timeout_s=timeout_s, min_edges=min_edges, on_timeout=OnTimeout(on_timeout)),
        transmitter=TransmitterSpec(s3=s3),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_spec(spec, path)


# MQTT -------------------------------------------------------------------------------------------


def client(
    url: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    inflight: int = 20,
) -> mqtt.Client:
    """A connected MQTT v5 client (clean session) with its network thread running."""
    from common.transport import BrokerOptions

    scheme, host, port, _ = BrokerOptions(url).parsed
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(inflight)
    if username:
        c.username_pw_set(username, password)
    if scheme == "mqtts":
        c.tls_set(ca_certs=ca_file)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(host, port)
    c.loop_start()
    if not connected.wait(10):
        raise AssertionError(f"cannot connect to {url}")
    return c


def retained(url: str, filters: Sequence[str], wait_s: float = 1.5, **login: Any) -> dict[str, bytes]:
    """The retained messages under ``filters`` (topic -> payload), as a new subscriber receives them."""
    got: dict[str, bytes] = {}
    c = client(url, **login)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, bytes(m.payload)) if m.retain else None
    for f in filters:
        c.subscribe(f, qos=1)
    time.sleep(wait_s)
    c.loop_stop()
    c.disconnect()
    return got


def node_status(url: str, node: str, **login: Any) -> dict[str, Any]:
    from common.protocol import Topics

    payload = retained(url, [Topics.node_status(node)], **login).get(Topics.node_status(node), b"{}")
    return dict(json.loads(payload or b"{}"))


def job_status(url: str, job: str, **login: Any) -> dict[str, Any]:
    from common.protocol import Topics

    payload = retained(url, [Topics.job_status(job)], **login).get(Topics.job_status(job), b"{}")
    return dict(json.loads(payload or b"{}"))


# logs and processes ------------------------------------------------------------------------------


def log_numbers(path: Path, pattern: str) -> list[int]:
    """The first integer group of ``pattern`` on every line of a log that matches it."""
    rx = re.compile(pattern)
    text = path.read_text(errors="replace") if path.exists() else ""
    return [int(m.group(1)) for m in rx.finditer(text)]


def wait_log(path: Path, needle: str, timeout_s: float) -> float:
    """Seconds until ``needle`` appears in the log at ``path``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if path.exists() and needle in path.read_text(errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} after {timeout_s} s")


class RssSampler:
    """Samples the resident set size of named processes every ``interval_s`` and keeps the peak of
    each; also the peak USS (memory unique to the process: RSS counts the shared torch libraries in
    every process) every ``uss_every`` samples."""

    def __init__(self, interval_s: float = 0.2, uss_every: int = 5) -> None:
        self.interval_s = interval_s
        self.uss_every = uss_every
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_uss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            for name, pid in list(self.pids.items()):
                try:
                    process = psutil.Process(pid)
                    rss = process.memory_info().rss
                    if n % self.uss_every == 0:
                        self.peak_uss[name] = max(self.peak_uss.get(name, 0), process.memory_full_info().uss)
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)


def stop(procs: Sequence[Any]) -> None:
    """Kill whatever is still running (test cleanup)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# S3 (moto's server mode over real HTTP, with IAM authentication enforced) ----------------------------

ALLOW_S3 = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


@dataclass
class MotoS3:
    url: str
    bucket: str
    keys: dict[str, tuple[str, str]]  # user -> (access key id, secret key)

    def client(self, user: str = "admin") -> Any:
        import boto3

        access, secret = self.keys[user]
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1"
        )

    def keys_under(self, prefix: str = "") -> dict[str, int]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def env_lines(self, user: str) -> str:
        access, secret = self.keys[user]
        return f"MISTNET_S3_ACCESS_KEY={access}\nMISTNET_S3_SECRET_KEY={secret}\n"


def _enforce_auth(after: float) -> None:
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = after
    ActionAuthenticatorMixin.request_count = 0


@pytest.fixture
def moto_s3() -> Any:
    """A moto S3 server on a free loopback port; IAM users admin, cloud and edge (keys in ``.keys``), a
    bucket ``features``; afterwards every request must be signed with one of those keys."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from broker.launcher import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    from moto.moto_api._internal.models import moto_api_backend

    try:
        _enforce_auth(float("inf"))
        moto_api_backend.reset()  # moto keeps its state per process, not per server
        iam = boto3.session.Session().client(
            "iam", endpoint_url=url, aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1"
        )
        keys = {}
        for user in ("admin", "cloud", "edge"):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=ALLOW_S3)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        s3 = MotoS3(url, "features", keys)
        s3.client().create_bucket(Bucket=s3.bucket)
        _enforce_auth(0)
        yield s3
    finally:
        _enforce_auth(float("inf"))
        moto_api_backend.reset()
        server.stop()
