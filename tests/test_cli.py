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
    assert set(summary) == {"job", "phase", "edges", "metrics", "checkpoint", "duration_s", "message"}
    assert summary["phase"] == "done" and len(summary["edges"]) == 2 and summary["message"] == ""
    assert summary["metrics"]["accuracy"] >= 0.90
    assert summary["metrics"]["accuracy"] > summary["metrics"]["accuracy_before"]
