"""``mistnet broker``: run a broker, create its accounts (init-auth) or throwaway TLS files (tls-init)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.auth import TlsFiles, init_auth
from broker.launcher import (
    AmqttBroker,
    BrokerError,
    find_mosquitto,
    local_config,
    mosquitto_from_config,
    mosquitto_version,
    parse_listeners,
    port_in_use,
    wait_for_port,
)
from broker.tls import tls_init
from common.errors import MistnetError
from common.lifecycle import interrupt_exit_code, sigterm_as_interrupt, spawn


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mistnet.commands.broker ACTION ...``: this command alone, as ``mistnet broker``."""
    parser = argparse.ArgumentParser(prog="mistnet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["broker", *(sys.argv[1:] if argv is None else argv)])
    try:
        with sigterm_as_interrupt():
            return int(args.func(args))
    except MistnetError as exc:
        print(f"mistnet broker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupt_exit_code(exc)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not between 1 and 65535")
    return port


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "broker", help="run an MQTT broker, create its accounts or TLS files", description=__doc__
    )
    sub = parser.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    add_run(sub)
    add_init_auth(sub)
    add_tls_init(sub)


def add_run(sub: Any) -> None:
    run_p = sub.add_parser(
        "run",
        help="run mosquitto in the foreground (amqtt when mosquitto is missing)",
        description="Run mosquitto in the foreground; without mosquitto, an in-process "
        "amqtt broker (MQTT 3.1.1 only, no auth, for small demos).  Ctrl-C or SIGTERM stops it (mosquitto "
        "saves --persistence first); mosquitto never outlives this command.",
    )
    run_p.add_argument("--port", type=_port, help="TCP port (default 1883, or the config's first listener)")
    run_p.add_argument("--config", type=Path, help="mosquitto config file (e.g. from `broker init-auth`)")
    run_p.add_argument(
        "--persistence", type=Path, metavar="DIR", help="keep retained messages and sessions in DIR across restarts"
    )
    run_p.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on without --config (default 127.0.0.1; the broker "
        "is anonymous then, so expose it only on trusted networks)",
    )
    run_p.set_defaults(func=run)


def add_init_auth(sub: Any) -> None:
    auth_p = sub.add_parser(
        "init-auth",
        help="write mosquitto.conf, passwd, acl and per-user credentials",
        description="Create broker accounts: the cloud, an optional monitor and one "
        "user per edge (named by its node id), with ACLs that confine each edge to its "
        "own topics.  Passwords are written only to OUT/credentials/NAME.env (0600).",
    )
    auth_p.add_argument("--nodes", type=_csv, required=True, help="edge node ids, comma-separated")
    auth_p.add_argument("--cloud", default="cloud", help="user name of the cloud agent (default cloud)")
    auth_p.add_argument(
        "--monitor", default="monitor", help="user name of the read-only monitor (default monitor; '' for none)"
    )
    auth_p.add_argument("--port", type=_port, default=1883, help="listener port (default 1883)")
    auth_p.add_argument(
        "--host", default="127.0.0.1", help="host name clients use in MISTNET_BROKER (default 127.0.0.1)"
    )
    auth_p.add_argument("--bind", help="listen on this address only (default: every interface)")
    auth_p.add_argument(
        "--tls-dir",
        type=Path,
        help="add a TLS listener with DIR/ca.crt, server.crt, server.key (from tls-init); "
        "credentials then point to mqtts:// with MISTNET_CA_FILE",
    )
    auth_p.add_argument("--tls-port", type=_port, default=8883, help="TLS listener port (default 8883)")
    auth_p.add_argument("--out", type=Path, required=True, help="output directory")
    auth_p.add_argument("--force", action="store_true", help="overwrite existing files (old passwords die)")
    auth_p.set_defaults(func=run_init_auth)


def add_tls_init(sub: Any) -> None:
    tls_p = sub.add_parser(
        "tls-init",
        help="throwaway CA, server and client certificates (tests, trials)",
        description="Create a throwaway CA, a broker certificate and client "
        "certificates with a mosquitto TLS listener snippet.  For tests and trials; "
        "use your own CA in production.",
    )
    tls_p.add_argument("--out", type=Path, required=True, help="output directory")
    tls_p.add_argument(
        "--hosts",
        type=_csv,
        default=["localhost", "127.0.0.1"],
        help="broker host names / IPs for the certificate (default localhost,127.0.0.1)",
    )
    tls_p.add_argument(
        "--clients",
        type=_csv,
        default=["client"],
        help="client certificate names (CN), comma-separated (default client)",
    )
    tls_p.add_argument("--port", type=_port, default=8883, help="TLS listener port (default 8883)")
    tls_p.add_argument(
        "--require-certificate", action="store_true", help="the snippet requires client certificates (mutual TLS)"
    )
    tls_p.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    tls_p.add_argument("--force", action="store_true", help="overwrite existing files")
    tls_p.set_defaults(func=run_tls_init)


# run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    binary = find_mosquitto()
    if binary is None:
        if args.config is not None:
            raise BrokerError("--config needs mosquitto, which is not installed (apt-get install mosquitto)")
        return _run_amqtt(args)
    workdir = Path(tempfile.mkdtemp(prefix="mistnet-broker-"))
    try:
        return _run_mosquitto(args, binary, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_mosquitto(args: argparse.Namespace, binary: str, workdir: Path) -> int:
    if args.config is not None:
        settings = {}
        if args.persistence is not None:
            settings = {"persistence": "true", "persistence_location": f"{_dir(args.persistence)}/"}
        handle = mosquitto_from_config(args.config, port=args.port, settings=settings, workdir=workdir, private=False)
        config, port, host, url = handle.config, handle.port, handle.host, handle.url
        bind = next((lst.bind for lst in parse_listeners(config.read_text()) if lst.port == port), None) or ""
    else:
        port, bind = args.port or 1883, args.bind
        persist = _dir(args.persistence) if args.persistence is not None else workdir
        config = workdir / "mosquitto.conf"
        config.write_text(
            local_config(port, persist, args.persistence is not None)
            .replace(f"listener {port} 127.0.0.1", f"listener {port} {bind}")
            .replace("log_type warning", "log_type warning\nlog_type notice")
        )
        host = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"mqtt://{host}:{port}"
    if port_in_use(port, bind if bind not in ("0.0.0.0", "::") else ""):
        raise BrokerError(f"port {port} is already in use (another broker?); choose one with --port")
    # SIGTERM or Ctrl-C stops mosquitto below; spawn() also stops it if we are killed outright.
    process = spawn([binary, "-c", str(config)], stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for_port(host, port, 10.0, process)
        except BrokerError as exc:
            raise BrokerError(f"mosquitto did not start with {config}: {exc} (its messages are above)") from None
        version = mosquitto_version(binary)
        print(f"mosquitto {version} running at {url} (config {config}); Ctrl-C stops it", flush=True)
        return process.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (sigterm_as_interrupt)
        print("stopping mosquitto", file=sys.stderr)
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def _dir(path: Path) -> Path:
    path = path.resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"--persistence {path}: {exc.strerror}") from None
    return path


def _run_amqtt(args: argparse.Namespace) -> int:
    if args.persistence is not None:
        print("warning: amqtt keeps nothing across restarts; --persistence is ignored", file=sys.stderr)
    port = args.port or 1883
    if port_in_use(port, args.bind):
        raise BrokerError(f"port {port} is already in use (another broker?); choose one with --port")
    broker = AmqttBroker(port=port, host=args.bind).start()
    try:
        print(
            f"mosquitto is not installed: amqtt (MQTT 3.1.1 only, anonymous) running at {broker.url}; Ctrl-C stops it",
            flush=True,
        )
        while broker.running:
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


# init-auth / tls-init ------------------------------------------------------------------------------


def run_init_auth(args: argparse.Namespace) -> int:
    tls = TlsFiles.from_dir(args.tls_dir, port=args.tls_port) if args.tls_dir is not None else None
    bundle = init_auth(
        args.out,
        args.nodes,
        cloud=args.cloud,
        monitor=args.monitor or None,
        port=args.port,
        host=args.host,
        bind=args.bind,
        tls=tls,
        force=args.force,
    )
    print(f"wrote {bundle.config}, {bundle.passwd} (hashed with {bundle.hasher}), {bundle.acl}")
    for name, path in bundle.credentials.items():
        print(f"  {bundle.roles[name]:<7} {name:<20} {path}")
    print(f"start the broker:  mistnet broker run --config {bundle.config}")
    print("give each agent its own file:  --credentials FILE  (passwords are only in those files)")
    return 0


def run_tls_init(args: argparse.Namespace) -> int:
    bundle = tls_init(
        args.out,
        args.hosts,
        args.clients,
        port=args.port,
        days=args.days,
        require_certificate=args.require_certificate,
        force=args.force,
    )
    print(f"wrote CA {bundle.ca_cert} (key {bundle.ca_key}), server {bundle.server_cert} + {bundle.server_key}")
    for name, (cert, key) in bundle.clients.items():
        print(f"  client {name}: {cert} {key}  settings: {bundle.env_files[name]}")
    print(f"mosquitto listener snippet: {bundle.conf}  (or `broker init-auth --tls-dir {bundle.out}`)")
    print(f"clients: mqtts://{args.hosts[0]}:{args.port} --ca-file {bundle.ca_cert}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
