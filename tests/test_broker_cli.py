"""`mistnet broker run | init-auth | tls-init` as a user runs them."""

from __future__ import annotations

import os
import selectors
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.launcher import find_mosquitto, free_port, port_in_use
from broker.probe import NOT_AUTHORIZED, SUCCESS, Probe
from common.transport import read_env_file
from mistnet.commands.broker import main

ROOT = Path(__file__).parents[1]


def test_init_auth_cli_never_prints_passwords(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "auth"
    assert main(["init-auth", "--nodes", "edge1,edge2", "--cloud", "hq", "--monitor", "dash",
                 "--port", "1999", "--host", "broker.lan", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for name in ("hq", "dash", "edge1", "edge2"):
        env = read_env_file(out / "credentials" / f"{name}.env")
        assert env["MISTNET_USERNAME"] == name and env["MISTNET_BROKER"] == "mqtt://broker.lan:1999"
        assert env["MISTNET_PASSWORD"] not in printed.out + printed.err
        assert str(out / "credentials" / f"{name}.env") in printed.out
        assert stat.S_IMODE((out / "credentials" / f"{name}.env").stat().st_mode) == 0o600
    assert "user hq" in (out / "acl").read_text() and "user dash" in (out / "acl").read_text()

    assert main(["init-auth", "--nodes", "edge1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err and "Traceback" not in err
    assert main(["init-auth", "--nodes", "edge1", "--out", str(out), "--force"]) == 0


def test_init_auth_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init-auth", "--nodes", "edge/1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistnet broker: error: ") and "not a valid name" in err and err.count("\n") == 1
    assert main(["init-auth", "--nodes", "e1", "--tls-dir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "ca.crt is missing" in capsys.readouterr().err


def test_tls_init_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tls-init", "--out", str(tmp_path), "--hosts", "broker.lan,10.1.2.3", "--clients", "edge1,cloud",
                 "--require-certificate"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"ca.crt", "ca.key", "server.crt", "server.key", "edge1.crt", "edge1.key", "cloud.env",
            "mosquitto-tls.conf"} <= names
    assert "mqtts://broker.lan:8883" in capsys.readouterr().out
    assert main(["tls-init", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mistnet.commands.broker", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _first_line(proc: subprocess.Popen[str], timeout_s: float = 5.0) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        raise AssertionError(f"no output within {timeout_s} s: {proc.communicate()}")
    return proc.stdout.readline()


def _interrupt(proc: subprocess.Popen[str], port: int) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0  # clean exit; 5 s was too short on a loaded 2-core machine
    deadline = time.monotonic() + 3
    while port_in_use(port, "127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not port_in_use(port, "127.0.0.1"), "the broker outlived the command"


@pytest.mark.integration
def test_run_mosquitto_foreground(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    port = free_port()
    proc = _start("run", "--port", str(port), "--persistence", str(tmp_path / "data"))
    try:
        line = _first_line(proc)
        assert line.startswith("mosquitto ") and f"mqtt://127.0.0.1:{port}" in line, line
        with Probe(f"mqtt://127.0.0.1:{port}") as p:
            assert p.connect() == SUCCESS
    finally:
        _interrupt(proc, port)


@pytest.mark.integration
@pytest.mark.security
def test_run_init_auth_config_on_another_port(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    assert main(["init-auth", "--nodes", "edge1", "--out", str(tmp_path / "auth")]) == 0
    port = free_port()
    # run as root, the system mosquitto user could not enter pytest's private tmp dir
    conf = tmp_path / "auth" / "mosquitto.conf"
    if os.geteuid() == 0:
        conf.write_text(conf.read_text() + "user root\n")
    proc = _start("run", "--config", str(conf), "--port", str(port))
    try:
        line = _first_line(proc)
        assert f"mqtt://127.0.0.1:{port}" in line, line
        password = read_env_file(tmp_path / "auth" / "credentials" / "edge1.env")["MISTNET_PASSWORD"]
        with Probe(f"mqtt://127.0.0.1:{port}", "edge1", password) as p:
            assert p.connect() == SUCCESS
        with Probe(f"mqtt://127.0.0.1:{port}") as anonymous:
            assert anonymous.connect() == NOT_AUTHORIZED
    finally:
        _interrupt(proc, port)


@pytest.mark.integration
def test_run_falls_back_to_amqtt() -> None:
    port = free_port()
    proc = _start("run", "--port", str(port), env={"MISTNET_MOSQUITTO": "none"})
    try:
        line = _first_line(proc, timeout_s=10)
        assert "amqtt" in line and f"mqtt://127.0.0.1:{port}?protocol=3.1.1" in line, line
        with Probe(f"mqtt://127.0.0.1:{port}?protocol=3.1.1") as p:
            assert p.connect() == SUCCESS
    finally:
        _interrupt(proc, port)


@pytest.mark.integration
def test_run_port_in_use(mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--port", str(mosquitto.port)]) == 2
    err = capsys.readouterr().err
    assert f"port {mosquitto.port} is already in use" in err and err.count("\n") == 1
