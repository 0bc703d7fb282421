"""SIGTERM, as containers and service managers send it: every long-running command stops cleanly,
saves what it must and leaves no child behind, even when the launcher itself is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from broker.launcher import Mosquitto, free_port, port_in_use
from broker.probe import SUCCESS, Probe
from cloud_agent.report import read_spool
from common.lifecycle import Terminated, interrupt_exit_code, sigterm_as_interrupt, sigterm_held, spawn
from common.protocol import NodeState, NodeStatus, Topics, from_json

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.integration


def start(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``mistnet ARGS`` with stdout and stderr in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mistnet.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path,
               timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not within {timeout_s} s (exit {proc.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.1)


def connected_to(proc: subprocess.Popen[bytes], port: int) -> Callable[[], bool]:
    """True once the process holds a TCP connection to ``port`` (its handlers are installed by then)."""
    def check() -> bool:
        try:
            return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in psutil.Process(proc.pid).net_connections("tcp"))
        except psutil.NoSuchProcess:
            return False
    return check


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def assert_all_gone(children: list[psutil.Process], timeout_s: float = 10) -> None:
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    assert not alive, f"orphaned: {[(p.pid, p.name()) for p in alive]}"


def terminate(proc: subprocess.Popen[bytes], log: Path, expected: int = 143) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 60 s after SIGTERM: {log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert code == expected, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def test_sigterm_becomes_a_keyboard_interrupt_once() -> None:
    caught = []
    with sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        except KeyboardInterrupt as exc:
            caught.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM while cleaning up is ignored
            time.sleep(0.05)
    assert isinstance(caught[0], Terminated) and interrupt_exit_code(caught[0]) == 143
    assert interrupt_exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_sigterm_inside_a_held_step_is_raised_when_the_step_ends() -> None:
    finished = []
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        with sigterm_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # not interrupted
            finished.append(True)
        finished.append(False)  # never reached: raised as the held step ends
    assert finished == [True]


def test_sigterm_during_a_fork_stops_the_launcher_once_the_child_is_started() -> None:
    """Python runs at-fork callbacks after a fork with ``preexec_fn`` and drops what a signal handler
    raises inside them; the demo once ran its whole job after a SIGTERM that landed there."""
    armed = [True]

    def sigterm_inside_the_callback() -> None:
        if armed and os.getpid() == parent:
            armed.clear()
            os.kill(parent, signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside the callback

    parent = os.getpid()
    os.register_at_fork(after_in_parent=sigterm_inside_the_callback)
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        spawn([sys.executable, "-c", "import time; time.sleep(30)"])
    assert not armed  # the callback ran, and what it raised was not lost
    for child in psutil.Process(parent).children():
        if child.cmdline()[-1:] == ["import time; time.sleep(30)"]:
            child.kill()


def test_broker_run_stops_on_sigterm_and_keeps_retained_messages(tmp_path: Path) -> None:
    port, data, log = free_port(), tmp_path / "data", tmp_path / "broker.log"
    proc = start(log, "broker", "run", "--port", str(port), "--persistence", str(data))
    wait_until(lambda: "running at" in log.read_text(), "broker started", proc, log)
    children = descendants(proc)
    assert [p.name() for p in children] == ["mosquitto"]
    with Probe(f"mqtt://127.0.0.1:{port}") as p:
        assert p.connect() == SUCCESS
        p.publish("mistnet/test/kept", b"survives a restart", retain=True)
    assert "stopping mosquitto" in terminate(proc, log, expected=0)
    assert_all_gone(children)
    assert not port_in_use(port, "127.0.0.1")
    assert (data / "mosquitto.db").is_file()

    proc = start(log, "broker", "run", "--port", str(port), "--persistence", str(data))
    wait_until(lambda: "running at" in log.read_text(), "broker restarted", proc, log)
    try:
        with Probe(f"mqtt://127.0.0.1:{port}") as p:
            assert p.connect() == SUCCESS and p.subscribe("mistnet/test/kept") == 1
            kept = p.wait_message("mistnet/test/kept")
        assert kept is not None and kept.payload == b"survives a restart" and kept.retain
    finally:
        terminate(proc, log, expected=0)


def test_killed_broker_launcher_leaves_no_mosquitto(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "broker.log"
    proc = start(log, "broker", "run", "--port", str(port))
    wait_until(lambda: "running at" in log.read_text(), "broker started", proc, log)
    children = descendants(proc)
    assert children
    proc.kill()  # no clean-up runs: the kernel's parent-death signal must stop mosquitto
    proc.wait()
    assert_all_gone(children)


def test_amqtt_fallback_stops_on_sigterm(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "amqtt.log"
    proc = start(log, "broker", "run", "--port", str(port), env={"MISTNET_MOSQUITTO": "none"})
    wait_until(lambda: "running at" in log.read_text(), "amqtt started", proc, log)
    terminate(proc, log, expected=0)
    assert not port_in_use(port, "127.0.0.1")


def test_edge_stops_on_sigterm_and_says_it_is_offline(tmp_path: Path, mosquitto: Mosquitto) -> None:
    log = tmp_path / "edge.log"
    proc = start(log, "edge", "--node", "sig-edge", "--broker", mosquitto.url)
    wait_until(connected_to(proc, mosquitto.port), "edge connected", proc, log)
    text = terminate(proc, log)
    assert "edge sig-edge stops" in text and "mistnet edge: terminated" in text
    with Probe(mosquitto.url) as p:
        assert p.connect() == SUCCESS and p.subscribe(Topics.node_status("sig-edge")) == 1
        status = p.wait_message(Topics.node_status("sig-edge"))
    assert status is not None and from_json(NodeStatus, status.payload).state == NodeState.OFFLINE


def test_cloud_stops_on_sigterm_with_its_state_saved(tmp_path: Path, mosquitto: Mosquitto) -> None:
    job, workdir, log = tmp_path / "job.yaml", tmp_path / "cloud", tmp_path / "cloud.log"
    job.write_text("kind: MistNetJob\nname: sig-job\nmodel: {arch: lenet5}\ncut_layer: 2\n"
                   "edges: [{node: absent-edge, dataset: x.npz}]\n")
    proc = start(log, "cloud", "--job", str(job), "--workdir", str(workdir), "--broker", mosquitto.url)
    wait_until(lambda: "collecting" in log.read_text(), "cloud collecting", proc, log)
    text = terminate(proc, log)
    assert "mistnet cloud: terminated" in text
    meta, _ = read_spool(workdir)  # closed cleanly: a restart resumes from here
    assert meta["phase"] == "collecting"


def test_monitor_stops_on_sigterm(tmp_path: Path, mosquitto: Mosquitto) -> None:
    log = tmp_path / "monitor.log"
    proc = start(log, "monitor", "--json", "--broker", mosquitto.url)
    wait_until(connected_to(proc, mosquitto.port), "monitor connected", proc, log)
    assert "mistnet monitor: terminated" in terminate(proc, log)


@pytest.mark.slow
def test_demo_stops_its_processes_on_sigterm_and_when_killed(tmp_path: Path) -> None:
    for how in ("SIGTERM", "SIGKILL"):
        log = tmp_path / f"demo-{how}.log"
        proc = start(log, "demo", "--epochs", "50", "--workdir", str(tmp_path / how))
        # broker, two edges and the cloud
        wait_until(lambda: len(descendants(proc)) >= 4, "demo started", proc, log, timeout_s=120)  # noqa: B023
        children = descendants(proc)
        if how == "SIGTERM":
            assert "mistnet demo: terminated" in terminate(proc, log)
        else:
            proc.kill()
            proc.wait()
        assert_all_gone(children, timeout_s=30)

