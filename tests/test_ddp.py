"""Tail training on several processes (DDP over gloo, real torchrun, real mosquitto, real edges)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.agents import finish, mistnet, spool_query, start_cloud, start_edge, wait_for
from tests.harness import mnist_base, write_job

pytestmark = pytest.mark.integration

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


def test_two_ranks_train_to_the_accuracy_of_one(tmp_path, tmp_path_factory, mosquitto):
    base = mnist_base(tmp_path_factory)
    one = write_job(base, tmp_path / "one.yaml", name="ddp-one", nodes=("one1",), epochs=2)
    two = write_job(base, tmp_path / "two.yaml", name="ddp-two", nodes=("two1",), epochs=2)
    edges = [start_edge(node, mosquitto.url, tmp_path) for node in ("one1", "two1")]
    single = start_cloud(one, mosquitto.url, tmp_path / "one")
    env = {**os.environ, "MISTNET_SAMPLE_LOG": str(tmp_path / "samples")}
    ddp = mistnet("cloud", "--job", str(two), "--broker", mosquitto.url, "--workdir", str(tmp_path / "two"), "--json",
                  "--nproc-per-node", "2", log=tmp_path / "cloud-two.log", env=env)  # fmt: skip
    by_one = json.loads(finish(single, 120))
    by_two = json.loads(finish(ddp, 120))
    assert ddp.returncode == 0, (tmp_path / "cloud-two.log").read_text()[-3000:]
    assert all(e.wait(30) == 0 for e in edges)
    assert by_one["phase"] == by_two["phase"] == "done"
    assert (by_one["world_size"], by_two["world_size"]) == (1, 2)
    assert by_two["metrics"]["accuracy"] > by_two["metrics"]["accuracy_before"]
    assert abs(by_two["metrics"]["accuracy"] - by_one["metrics"]["accuracy"]) <= 0.02, (by_one, by_two)
    assert_each_sample_once_per_epoch(sample_log(tmp_path / "samples", 2, 2), 1500)


def test_killed_rank_restarts_the_group_which_resumes_after_the_last_epoch(tmp_path, tmp_path_factory, mosquitto):
    base = mnist_base(tmp_path_factory)
    epochs = 6
    job = write_job(base, tmp_path / "job.yaml", name="ddp-kill", nodes=("kill1",), epochs=epochs)
    edge = start_edge("kill1", mosquitto.url, tmp_path)
    env = {**os.environ, "MISTNET_SAMPLE_LOG": str(tmp_path / "samples"), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "cloud.log"
    # The documented torchrun form.
    cloud = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
         "-m", "mistnet", "cloud", "--job", str(job), "--broker", mosquitto.url, "--workdir", str(tmp_path / "cloud"),
         "--json"],
        stdout=subprocess.PIPE, stderr=log.open("ab"), env=env,
    )  # fmt: skip
    try:
        saved = tmp_path / "cloud" / "state" / "last.optim.pt"
        wait_for(lambda: saved.exists() and (tmp_path / "samples" / "epoch2-rank1.json").exists(), 90,
                 "epoch 1 checkpointed")  # fmt: skip
        victim = ranks_of(cloud)[1]
        victim.send_signal(signal.SIGKILL)
        summary = json.loads(finish(cloud, 120))
    finally:
        if cloud.poll() is None:
            cloud.kill()
    text = log.read_text()
    assert cloud.returncode == 0, text[-3000:]
    assert edge.wait(30) == 0
    assert summary["phase"] == "done" and summary["world_size"] == 2
    records = sample_log(tmp_path / "samples", epochs, 2)
    restarts = [r[0]["restart"] for r in records]
    assert restarts[0] == 0 and restarts[-1] == 1, f"no restart after the kill: {restarts}"
    assert restarts == sorted(restarts)
    resumed = restarts.index(1)  # the first epoch the restarted group trained
    assert f"resuming training after epoch {resumed}" in text
    assert resumed >= 1, "the restarted group trained from scratch"
    assert_each_sample_once_per_epoch(records, 1500)
    history = json.loads(spool_query(tmp_path / "cloud", "SELECT value FROM meta WHERE key='history'")[0][0])
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
