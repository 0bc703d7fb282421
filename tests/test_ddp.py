"""Tail training on several processes (DDP over gloo, real torchrun, real mosquitto, real edges)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from broker.launcher import local_mosquitto
from tests.agents import finish, mistnet, spool_query, spooled_samples, start_cloud, start_edge, wait_for
from tests.harness import mnist_base, moto_s3, stop, write_job

if TYPE_CHECKING:
    from common.jobspec import JobSpec

__all__ = ["moto_s3"]

EPOCHS = 8
HELD_BACK = 0.1  # cloud.selection_fraction's default: these samples choose the epoch, never train


def sample_log(folder: Path, epochs: int, world: int) -> list[list[dict]]:
    """Per epoch, each rank's record of the samples it trained on."""
    return [[json.loads((folder / f"epoch{e}-rank{r}.json").read_text()) for r in range(world)]
            for e in range(1, epochs + 1)]  # fmt: skip


def assert_each_sample_once_per_epoch(records: list[list[dict]], total: int) -> None:
    trained = total - int(total * HELD_BACK)
    first = None
    for ranks in records:
        seen = [tuple(s) for r in ranks for s in r["samples"]]
        assert len({r["restart"] for r in ranks}) == 1, "an epoch's records come from different attempts"
        assert len(seen) == len(set(seen)) == trained, (len(seen), len(set(seen)), trained)
        assert all(len(r["samples"]) in (trained // 2, trained - trained // 2) for r in ranks)
        first = first or set(seen)
        assert set(seen) == first  # the same training samples every epoch, shared out afresh


def ranks_of(launcher: subprocess.Popen[bytes]) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


@dataclass
class Runs:
    """One MNIST job trained by one process, and the same job by two ranks (`mistnet cloud
    --nproc-per-node 2`), rank 1 killed with SIGKILL after epoch 2 (the two run side by side, each
    with its own edge)."""

    root: Path
    broker: str
    by_one: dict
    by_two: dict
    log: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Runs]:
    base = mnist_base(tmp_path_factory)
    root = tmp_path_factory.mktemp("ddp")
    broker = local_mosquitto(root / "mosquitto").start()
    one = write_job(base, root / "one.yaml", name="ddp-one", nodes=("one1",), epochs=EPOCHS)
    two = write_job(base, root / "two.yaml", name="ddp-two", nodes=("two1",), epochs=EPOCHS)
    edges = [start_edge(node, broker.url, root) for node in ("one1", "two1")]
    single = start_cloud(one, broker.url, root / "one")
    env = {**os.environ, "MISTNET_SAMPLE_LOG": str(root / "samples")}
    log = root / "cloud-two.log"
    # torchrun's launcher in-process; each rank runs `python -m mistnet cloud ...`, as under `torchrun -m mistnet`.
    ddp = mistnet("cloud", "--job", str(two), "--broker", broker.url, "--workdir", str(root / "two"), "--json",
                  "--nproc-per-node", "2", "--max-restarts", "1", log=log, env=env)  # fmt: skip
    try:
        saved = root / "two" / "state" / "last.optim.pt"
        wait_for(lambda: saved.exists() and (root / "samples" / "epoch2-rank1.json").exists(), 90,
                 "epoch 2 trained and a checkpoint saved")  # fmt: skip
        ranks_of(ddp)[1].send_signal(signal.SIGKILL)
        by_two = json.loads(finish(ddp, 120))
        by_one = json.loads(finish(single, 60))
        assert ddp.returncode == 0 and single.returncode == 0, log.read_text()[-3000:]
        assert all(e.wait(30) == 0 for e in edges)
        yield Runs(root, broker.url, by_one, by_two, log.read_text())
    finally:
        stop([ddp, single, *edges])
        broker.stop()


@pytest.mark.integration
def test_two_ranks_train_to_the_accuracy_of_one(runs):
    by_one, by_two = runs.by_one, runs.by_two
    assert by_one["phase"] == by_two["phase"] == "done"
    assert (by_one["world_size"], by_two["world_size"]) == (1, 2)
    assert by_two["metrics"]["accuracy"] > by_two["metrics"]["accuracy_before"] + 0.1
    assert abs(by_two["metrics"]["accuracy"] - by_one["metrics"]["accuracy"]) <= 0.02, (by_one, by_two)


@pytest.mark.integration
@pytest.mark.fault
def test_killed_rank_restarts_the_group_which_resumes_after_the_last_epoch(runs):
    records = sample_log(runs.root / "samples", EPOCHS, 2)
    restarts = [r[0]["restart"] for r in records]
    assert restarts[0] == 0 and restarts[-1] == 1, f"no restart after the kill: {restarts}"
    assert restarts == sorted(restarts)
    resumed = restarts.index(1)  # epochs the first attempt checkpointed: the restarted group trains the rest
    assert resumed >= 2, f"the restarted group trained from epoch {resumed + 1}"
    assert f"resuming training after epoch {resumed}" in runs.log
    assert_each_sample_once_per_epoch(records, 1500)
    history = json.loads(spool_query(runs.root / "two", "SELECT value FROM meta WHERE key='history'")[0][0])
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))


@pytest.mark.integration
def test_two_nodes_without_a_shared_filesystem_train_from_the_feature_store(runs, moto_s3, tmp_path_factory):
    """Two launchers as two machines (`--nnodes 2`), each with its own work directory: the rank on
    the node without rank 0's spool reads the samples from S3 (cloud.feature_store)."""
    from broker.launcher import free_port

    root = tmp_path_factory.mktemp("nodes")
    store = f"s3://{moto_s3.bucket}/shared"
    job = write_job(mnist_base(tmp_path_factory), root / "nodes.yaml", name="ddp-nodes", nodes=("nodes1",),
                    epochs=EPOCHS, feature_store=store)  # fmt: skip
    access, secret = moto_s3.keys["cloud"]
    env = {**os.environ, "MISTNET_SAMPLE_LOG": str(root / "samples"), "MISTNET_S3_ENDPOINT": moto_s3.url,
           "MISTNET_S3_ACCESS_KEY": access, "MISTNET_S3_SECRET_KEY": secret}  # fmt: skip
    edge = start_edge("nodes1", runs.broker, root)
    rdzv = f"127.0.0.1:{free_port()}"
    nodes = [mistnet("cloud", "--job", str(job), "--broker", runs.broker, "--workdir", str(root / f"node{k}"),
                     "--json", "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", rdzv,
                     log=root / f"node{k}.log", env=env) for k in (1, 2)]  # fmt: skip
    try:
        outputs = [finish(node, 120) for node in nodes]
        logs = "".join((root / f"node{k}.log").read_text() for k in (1, 2))
        assert [node.returncode for node in nodes] == [0, 0] and edge.wait(30) == 0, logs[-3000:]
    finally:
        stop([*nodes, edge])
    # c10d's rendezvous ranks the nodes in no fixed order: rank 0 ran on one of them.
    first = next(k for k, out in enumerate(outputs) if out.strip())
    summary, other = json.loads(outputs[first]), root / f"node{2 - first}"
    assert summary["phase"] == "done" and summary["world_size"] == 2, summary
    assert len(spooled_samples(root / f"node{first + 1}")) == 1500
    assert spooled_samples(other) == [] and not any(other.glob("*.segments/*"))
    assert "reading the job's samples from its feature store (1500)" in logs
    assert "shared/ddp-nodes/features-index.json" in moto_s3.keys_under("shared/ddp-nodes/")
    assert_each_sample_once_per_epoch(sample_log(root / "samples", EPOCHS, 2), 1500)
    assert abs(summary["metrics"]["accuracy"] - runs.by_one["metrics"]["accuracy"]) <= 0.02, (runs.by_one, summary)


def tiny_job() -> JobSpec:
    from common.jobspec import build_job

    return build_job({"name": "j", "model": {"arch": "lenet5", "num_classes": 10}, "cut_layer": 2,
                      "edges": [{"node": "e", "dataset": "x", "batch_size": 8}]})  # fmt: skip


def test_rank_0_shares_its_adaptation_with_ranks_whose_node_lacks_it(tmp_path):
    import torch
    import torch.distributed as dist

    from broker.launcher import free_port
    from cloud_agent.adaptation import Adaptation
    from cloud_agent.agent import CloudAgent
    from cloud_agent.distributed import Ranks
    from cloud_agent.training import receive_adaptation
    from common.transport import BrokerOptions

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    spec = tiny_job()
    first, other = (CloudAgent(spec, BrokerOptions(), tmp_path / f"node{r}", "cpu",
                               Ranks(r, 2, 0, "cpu", dist.PrefixStore("mistnet/attempt-0", store)))
                    for r, store in enumerate((server, client)))  # fmt: skip
    receive_adaptation(other.job)
    assert not other.job.adaptation_path.exists()  # rank 0 shared nothing: no adaptation in this job
    thresholds = {1: torch.tensor([0.25, -1.5])}
    Adaptation(1, thresholds, None).save(first.job.adaptation_path)
    other.job.adaptation_path.write_bytes(b"another job's adaptation")
    first.training.share_adaptation()
    receive_adaptation(other.job)
    assert other.job.adaptation_path.read_bytes() == first.job.adaptation_path.read_bytes()
    assert torch.equal(Adaptation.load(other.job.adaptation_path).thresholds[1], thresholds[1])
    assert [p.name for p in other.job.workdir.iterdir() if p.name.startswith(".")] == []  # no temporary left
    for agent in (first, other):
        agent.job.spool.close()


@pytest.mark.parametrize("empty_spool", [False, True])
def test_a_rank_with_neither_samples_nor_feature_store_stops_with_a_clear_error(tmp_path, empty_spool):
    import torch.distributed as dist

    from cloud_agent.distributed import TRAIN, TRAINING_KEY, Ranks
    from cloud_agent.spool import Spool
    from cloud_agent.worker import run_worker
    from common.errors import MistnetError

    store = dist.HashStore()
    store.set(TRAINING_KEY, TRAIN)
    spec = tiny_job()
    workdir = tmp_path / "node2"
    if empty_spool:  # e.g. left by an earlier job on this node
        workdir.mkdir()
        Spool(workdir / "spool.sqlite").close()
    held = "none of the job's samples" if empty_spool else "no spool"
    with pytest.raises(MistnetError, match=rf"^rank 1: .*node2 holds {held} and the job names no feature store"):
        run_worker(spec, workdir, Ranks(1, 2, 0, "cpu", store))
    assert workdir.exists() == empty_spool


@pytest.mark.parametrize("size", [1, 2, 63, 64, 65, 127, 128, 129, 200])
@pytest.mark.parametrize(("batch", "world"), [(64, 2), (64, 3), (2, 2), (3, 2)])
def test_rank_batches_use_each_sample_once_in_the_global_batches_of_one_process(size, batch, world):
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    from cloud_agent.distributed import RankBatches

    if size < world:
        return  # refused by DistributedTrainer before any batch is drawn
    shares = [list(RankBatches(size, batch, r, world, seed=7)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1, "ranks take different numbers of steps"
    assert all(len(s) == len(RankBatches(size, batch, r, world, 7)) for r, s in enumerate(shares))
    assert all(part for s in shares for part in s), "a rank got an empty share of a batch"
    used = [i for s in shares for part in s for i in part]
    assert sorted(used) == list(range(size))
    one = list(BatchSampler(RandomSampler(range(size), generator=torch.Generator().manual_seed(7)), batch, False))
    joined = [sorted(i for s in shares for i in s[k]) for k in range(len(shares[0]))]
    merged = size > batch and 0 < size % batch < world  # the last two batches of one process, shared out again
    same = len(one) - 2 if merged else len(one)
    assert joined[:same] == [sorted(b) for b in one[:same]]
    assert sorted(i for b in joined[same:] for i in b) == sorted(i for b in one[same:] for i in b)
