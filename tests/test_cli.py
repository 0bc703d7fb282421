"""The `mistnet` command as a user meets it: help for every subcommand, one-line errors, the demo."""

import json
import subprocess
import sys

import pytest

from mistnet.cli import COMMANDS


def mistnet(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mistnet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [["job", "validate"], ["job", "cancel"],
                                                                ["broker", "init-auth"], ["broker", "run"]])
def test_every_subcommand_has_help(command):
    result = mistnet(*command, "--help")
    assert result.returncode == 0 and "usage: mistnet" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cloud", "--job", "does-not-exist.yaml"], "does-not-exist.yaml"),
        (["edge", "--node", "bad/name"], "not a valid name"),
        (["edge", "--node", "e1", "--broker", "http://x"], "scheme must be mqtt"),
        (["demo", "--edges", "0"], "--edges must be at least 1"),
        (["edge", "--node", "e1", "--max-epsilon", "nan"], "max_epsilon: Input should be a finite number"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    result = mistnet(*args, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_unreachable_broker_is_named(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("kind: MistNetJob\nname: j\nmodel: {arch: lenet5}\ncut_layer: 2\n"
                   "edges: [{node: e1, dataset: x.npz}]\n")
    result = mistnet("cloud", "--job", str(job), "--workdir", str(tmp_path / "w"), "--broker", "mqtt://127.0.0.1:1",
                     "--connect-timeout", "2", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot connect to mqtt://127.0.0.1:1" in result.stderr


@pytest.mark.integration
def test_demo_json_meets_its_promises(tmp_path):
    result = mistnet("demo", "--json", "--workdir", str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert set(summary) == {"job", "phase", "edges", "metrics", "checkpoint", "duration_s", "message",
                            "selected_epoch", "baselines", "world_size"}  # fmt: skip
    assert summary["phase"] == "done" and len(summary["edges"]) == 2 and summary["message"] == ""
    assert summary["world_size"] == 1
    # 10% of the 3000 received samples chose the epoch that shipped; MNIST improves on the start.
    assert 1 <= summary["selected_epoch"] <= 6 and summary["baselines"] == {}
    assert summary["metrics"]["accuracy"] >= 0.90
    assert summary["metrics"]["accuracy"] > summary["metrics"]["accuracy_before"]
    # stderr is a pipe, not a terminal: one plain line per phase and epoch instead of a live table
    lines = [line.split(" ", 1)[1] for line in result.stderr.splitlines()[2:]]
    assert len(lines) < 40, result.stderr
    for epoch in range(1, 7):
        assert sum(line.startswith(f"job mnist-demo: training, epoch {epoch}/6,") for line in lines) == 1, lines
    for phase in ("collecting", "training", "evaluating", "done"):
        assert any(line.startswith(f"job mnist-demo: {phase}") for line in lines), lines
    assert any(line.startswith("edge edge1: done, job mnist-demo: 1500/1500") for line in lines), lines
    # the cloud and the edges, logging to files, write a line per phase and per epoch too
    cloud_log = (tmp_path / "logs" / "cloud.log").read_text()
    assert all(f"epoch {epoch}/6 loss" in cloud_log for epoch in range(1, 7))
    assert all(f"job mnist-demo: {phase}" in cloud_log for phase in ("collecting", "training", "evaluating", "done"))
    assert "job mnist-demo done: 1500 samples acknowledged" in (tmp_path / "logs" / "edge1.log").read_text()
