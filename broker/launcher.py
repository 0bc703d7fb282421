"""Start a broker for demos, tests and users without one.

* :func:`local_mosquitto` - a private, anonymous mosquitto on a free loopback port (not yet started).
* :func:`mosquitto_from_config` - mosquitto from a given config file (an ``init-auth`` or TLS config),
  with its listener port(s) and paths optionally rewritten.
* :func:`start_embedded_broker` - a started broker: mosquitto when installed, else amqtt in-process.
  amqtt speaks MQTT 3.1.1 only, so its handle says ``protocol == "mqttv311"`` and its URL ends in
  ``?protocol=3.1.1`` for clients to fall back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from common.errors import MistnetError
from common.lifecycle import spawn

log = logging.getLogger(__name__)

MQTT_V5 = "mqttv5"
MQTT_V311 = "mqttv311"


class BrokerError(MistnetError, RuntimeError):
    """The broker could not be started or configured (printed as one line by the CLI)."""


class BrokerHandle(Protocol):
    """What :func:`start_embedded_broker` returns, whichever broker runs."""

    kind: str
    protocol: str

    @property
    def url(self) -> str: ...

    @property
    def port(self) -> int: ...

    def stop(self) -> None: ...


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (``PATH`` or ``/usr/sbin``), or None.

    ``MISTNET_MOSQUITTO`` overrides the search: a path to a binary, or ``none`` to act as if
    mosquitto were not installed (the amqtt fallback).
    """
    override = os.environ.get("MISTNET_MOSQUITTO")
    if override is not None:
        if override.strip().lower() in ("", "none", "0", "false"):
            return None
        return shutil.which(override)
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_version(binary: str | None = None) -> str:
    """'2.0.11' or '' when unknown."""
    binary = binary or find_mosquitto()
    if binary is None:
        return ""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"mosquitto version (\S+)", out)
    return match.group(1) if match else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "") -> bool:
    """True when something already listens on ``host:port`` ('' = every interface).

    SO_REUSEADDR, as mosquitto sets it, so connections in TIME_WAIT do not count.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(
    host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts TCP; fail at once if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"the broker exited with status {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"nothing is listening on {host}:{port} after {timeout_s:.0f} s")


def _root_user_line() -> list[str]:
    # mosquitto started as root drops to user "mosquitto", which cannot read a root-owned private
    # workdir (tests, demos); these private loopback brokers stay with the current user instead.
    return ["user root"] if os.geteuid() == 0 else []


def local_config(port: int, workdir: Path, persistence: bool) -> str:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "max_queued_messages 10000",
        "max_inflight_messages 100",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        *_root_user_line(),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Mosquitto:
    """A mosquitto child process; ``url`` is what agents connect to."""

    port: int
    workdir: Path
    config: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)
    host: str = "127.0.0.1"
    scheme: str = "mqtt"
    kind: str = "mosquitto"
    protocol: str = MQTT_V5

    def __post_init__(self) -> None:
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        with self.log.open("ab") as log_file:
            self.process = spawn(
                [binary, "-c", str(self.config)], stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL
            )
        try:
            wait_for_port(self.host, self.port, timeout_s, self.process)
        except BrokerError as exc:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:].strip()
            raise BrokerError(f"mosquitto did not start ({exc}): {tail}") from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_mosquitto(workdir: Path | None = None, port: int | None = None, persistence: bool = False) -> Mosquitto:
    """A configured (not yet started) mosquitto on a free loopback port."""
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mistnet-broker-"))
    wd.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = wd / "mosquitto.conf"
    config.write_text(local_config(port, wd, persistence))
    return Mosquitto(port=port, workdir=wd, config=config)


# Configs from files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    port: int
    bind: str | None
    tls: bool


def parse_listeners(text: str) -> list[Listener]:
    """The TCP listeners of a mosquitto config, in order (``tls`` when the block has a certfile)."""
    found: list[list[Any]] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "listener" and len(words) >= 2 and words[1].isdigit() and int(words[1]) > 0:
            found.append([int(words[1]), words[2] if len(words) > 2 else None, False])
        elif words[0] == "port" and len(words) == 2 and words[1].isdigit():
            found.append([int(words[1]), None, False])
        elif words[0] in ("certfile", "psk_hint") and found:
            found[-1][2] = True
    return [Listener(port=p, bind=b, tls=t) for p, b, t in found]


def rewrite_config(
    text: str,
    *,
    port: int | None = None,
    port_map: Mapping[int, int] | None = None,
    settings: Mapping[str, str] | None = None,
    private: bool = False,
) -> str:
    """A copy of a mosquitto config with listener ports and single-valued settings replaced.

    ``port`` replaces the first listener's port, ``port_map`` maps old ports to new ones, and
    ``settings`` replaces the value of each named directive wherever it appears (appending it when
    absent), e.g. ``{"password_file": "/tmp/x/passwd", "persistence_location": "/tmp/x/data/"}``.
    ``private`` adds ``user root`` when running as root (see :func:`local_config`), for test brokers.
    """
    mapping = dict(port_map or {})
    listeners = parse_listeners(text)
    if port is not None:
        if not listeners:
            raise BrokerError("the config has no TCP listener whose port could be replaced")
        mapping.setdefault(listeners[0].port, port)
    values = dict(settings or {})
    todo = dict(values)
    out: list[str] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if words and words[0] in ("listener", "port") and len(words) >= 2 and words[1].isdigit():
            new = mapping.get(int(words[1]))
            if new is not None:
                raw = " ".join([words[0], str(new), *words[2:]])
        elif words and words[0] in values:
            raw = f"{words[0]} {values[words[0]]}"
            todo.pop(words[0], None)
        out.append(raw)
    out.extend(f"{key} {value}" for key, value in todo.items())
    if private and not any(line.split()[:1] == ["user"] for line in out):
        out.extend(_root_user_line())
    return "\n".join(out) + "\n"


def mosquitto_from_config(
    config: Path,
    *,
    port: int | None = None,
    port_map: Mapping[int, int] | None = None,
    settings: Mapping[str, str] | None = None,
    workdir: Path | None = None,
    private: bool = True,
) -> Mosquitto:
    """A (not yet started) mosquitto running a given config file, e.g. ``init-auth`` output.

    Without rewrites (no port, port_map, settings, nor the root adaptation of ``private``) the file
    is used as it is; otherwise a rewritten copy goes to ``workdir``.  The handle's port, host and
    scheme (``mqtts`` for a TLS listener) are those of the first listener after rewriting.
    """
    try:
        text = Path(config).read_text()
    except OSError as exc:
        raise BrokerError(f"cannot read broker config {config}: {exc.strerror}") from None
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mistnet-broker-"))
    wd.mkdir(parents=True, exist_ok=True)
    new_text = rewrite_config(text, port=port, port_map=port_map, settings=settings, private=private)
    if new_text.rstrip("\n") == text.rstrip("\n"):
        path = Path(config)
    else:
        path = wd / "mosquitto.conf"
        if path.resolve() == Path(config).resolve():
            path = wd / "mosquitto.rewritten.conf"
        path.write_text(new_text)
    listeners = parse_listeners(new_text)
    if not listeners:
        raise BrokerError(f"broker config {config} has no TCP listener")
    first = listeners[0]
    host = first.bind if first.bind and first.bind not in ("0.0.0.0", "::") else "127.0.0.1"
    return Mosquitto(port=first.port, workdir=wd, config=path, host=host, scheme="mqtts" if first.tls else "mqtt")


# amqtt fallback ---------------------------------------------------------------------------------------


class AmqttBroker:
    """amqtt (pure Python, MQTT 3.1.1 only) in a background thread of this process; anonymous."""

    kind = "amqtt"
    protocol = MQTT_V311

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self._port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self._port}?protocol=3.1.1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> AmqttBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise BrokerError(
                "neither mosquitto nor amqtt is installed (apt-get install mosquitto, or pip install 'mistnet[cloud]')"
            ) from None
        amqtt_log = logging.getLogger("amqtt")
        if amqtt_log.level == logging.NOTSET:
            amqtt_log.setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self._port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise BrokerError(f"amqtt did not start within {timeout_s:.0f} s")
        if failure:
            self._thread.join(1)
            self._thread = None
            raise BrokerError(f"amqtt did not start on {self.host}:{self._port}: {failure[0]}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(timeout=5)
        except Exception as exc:  # shutting down anyway
            log.debug("amqtt shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._thread = None

    def __enter__(self) -> AmqttBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded_broker(
    workdir: Path | None = None,
    *,
    prefer: Literal["auto", "mosquitto", "amqtt"] = "auto",
    port: int | None = None,
    persistence: bool = False,
    config: Path | None = None,
    settings: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Mosquitto | AmqttBroker:
    """A started broker on a free loopback port; ``.url``, ``.kind``, ``.protocol``, ``.stop()``.

    ``prefer="auto"``: mosquitto when installed, else amqtt in-process (MQTT 3.1.1, URL with
    ``?protocol=3.1.1``).  ``config`` (e.g. ``init-auth`` or TLS output) needs mosquitto; its first
    listener moves to ``port`` (a free one when None).
    """
    if config is not None:
        if find_mosquitto() is None:
            raise BrokerError("a broker config file needs mosquitto, which is not installed")
        return mosquitto_from_config(Path(config), port=port or free_port(), settings=settings,
                                     workdir=workdir).start(timeout_s)
    use_mosquitto = prefer == "mosquitto" or (prefer == "auto" and find_mosquitto() is not None)
    if use_mosquitto:
        return local_mosquitto(workdir, port=port, persistence=persistence).start(timeout_s)
    if persistence:
        log.warning("amqtt fallback: no persistence; retained messages are lost when it stops")
    return AmqttBroker(port=port).start(timeout_s)
