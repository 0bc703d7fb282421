"""Starting real agent processes for integration tests (the same CLI a user runs)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mistnet.demo import DemoOptions, prepare_mnist_job

REPO = Path(__file__).resolve().parents[1]


def mistnet(*args: str, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    # One torch thread per agent: several agents share two cores, and oversubscription costs 4x here.
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mistnet.cli", *args], stdout=subprocess.PIPE, stderr=log.open("ab"),
                            env=env)


def start_edge(
    node: str, broker_url: str, tmp: Path, *extra: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return mistnet("edge", "--node", node, "--broker", broker_url, "--once", *extra, log=tmp / f"{node}.log", env=env)


def without(tmp: Path, blocked: Iterable[str], why: str) -> dict[str, str]:
    """Environment for a Python process that cannot import the top-level packages ``blocked`` (their
    import fails with ``{name} {why}``), as on a machine that does not have them."""
    site = tmp / "blocked-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {sorted(blocked)!r}\n"
        "class Blocked(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        f"            raise ModuleNotFoundError(f'{{name}} {why}', name=name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_cloud(job: Path, broker_url: str, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return mistnet(
        "cloud",
        "--job",
        str(job),
        "--broker",
        broker_url,
        "--workdir",
        str(workdir),
        "--json",
        *extra,
        log=workdir.parent / f"cloud-{workdir.name}.log",
    )


def mnist_job(tmp: Path, edges: int = 2, epochs: int = 3, epsilon: float = 100.0) -> Path:
    return prepare_mnist_job(DemoOptions(edges=edges, epochs=epochs, epsilon=epsilon), tmp)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def spool_query(workdir: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Read the cloud's spool from outside (WAL mode lets readers in while it writes)."""
    path = workdir / "spool.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def spooled_samples(workdir: Path) -> list[tuple[str, int, bytes, bytes]]:
    """(node, id, label, features) of every spooled sample in (node, id) order, read through the
    spool (features live in its segment files); reading never changes the spool."""
    from cloud_agent.spool import Spool, SpoolFeatures

    spool = Spool(workdir / "spool.sqlite")
    try:
        nodes = [str(n) for (n,) in spool.db.execute("SELECT DISTINCT node FROM samples")]
        data = SpoolFeatures(spool, nodes)
        return [(s.node, s.id, s.label, s.features) for s in data.__getitems__(list(range(len(data))))]
    finally:
        spool.close()


def committed_transfers(workdir: Path, node: str) -> int:
    rows = spool_query(workdir, "SELECT COUNT(*) FROM transfers WHERE node=?", node)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def finish(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return out


def run_two_edge_job(job: Path, broker_url: str, tmp: Path, timeout_s: float) -> dict[str, Any]:
    """edge1 and edge2 (``--once``) and a cloud for ``job``; the cloud's JSON summary once all exited cleanly."""
    edges = [start_edge(f"edge{k}", broker_url, tmp) for k in (1, 2)]
    cloud = start_cloud(job, broker_url, tmp / "cloud")
    summary: dict[str, Any] = json.loads(finish(cloud, timeout_s))
    assert cloud.returncode == 0, (tmp / "cloud-cloud.log").read_text()[-3000:]
    for e in edges:
        assert e.wait(30) == 0
    return summary
