"""What every benchmark shares: paths, medians and ratios, child processes with their peak memory,
and a record of how loaded the machine was while it ran."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.errors import MistnetError
from scenarios.defaults import SHARED

REPO = Path(__file__).resolve().parents[1]
# The data the benchmarks read: the commands' default beside the checkout, unless MISTNET_BENCH_SHARED
# points elsewhere (e.g. on a lent GPU machine).
BENCH_SHARED = Path(os.environ.get("MISTNET_BENCH_SHARED") or SHARED)
COCO128 = BENCH_SHARED / "data" / "coco128"
YOLOV5N_WEIGHTS = BENCH_SHARED / "weights" / "yolov5n.pt"
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
MIB = 1024 * 1024


def default_out(profile: str) -> Path:
    return RESULTS if profile == "full" else RESULTS / profile


def default_docs(profile: str, out: Path) -> Path:
    """The full run regenerates docs/benchmarks.md; other profiles write their page beside their JSON."""
    return DOCS / "benchmarks.md" if profile == "full" else out / "benchmarks.md"


class BenchError(MistnetError):
    """A benchmark could not run (missing data or broker, a child process failed)."""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> list[float]:
    """[min, max] of the runs, for the report."""
    return [float(min(values)), float(max(values))] if values else []


def paired_ratio(system: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over the interleaved pairs of system/baseline: each pair ran back to back under
    about the same load, so the per-pair ratio cancels most of the machine's drift."""
    pairs = [s / b for s, b in zip(system, baseline, strict=True) if b > 0]
    return median(pairs)


def interleave(
    repeats: int, baseline: Callable[[int], float], system: Callable[[int], float]
) -> tuple[list[float], list[float]]:
    """baseline, system, baseline, system, ...: ``repeats`` of each, in that order."""
    base: list[float] = []
    sys_: list[float] = []
    for r in range(repeats):
        base.append(baseline(r))
        sys_.append(system(r))
    return base, sys_


# Child processes -----------------------------------------------------------------------------------


def child_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a benchmark child: this interpreter's path, unbuffered output, and the
    same number of intra-op threads for the baseline as for the system (``OMP_NUM_THREADS``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


@dataclass
class Child:
    """A started child process whose stdout we keep and whose exact peak RSS we read at exit."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    out: Path
    maxrss: int = 0  # bytes, from wait4 (the kernel's high-water mark of this process)
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code once it has exited (reaping it with ``wait4`` for its peak RSS), else None."""
        if self.returncode is None:
            try:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: the exit code, no peak RSS
                self.returncode = self.proc.poll()
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode
                self.maxrss = int(usage.ru_maxrss) * 1024
        return self.returncode

    def wait(self, timeout_s: float) -> int:
        """Wait for exit (see :meth:`poll`); kills it after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.name} did not finish within {timeout_s:.0f} s; log: {self.log}")
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        if self.returncode is None and self.proc.poll() is None:
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired, ChildProcessError):
            self.proc.wait(timeout=10)
        if self.returncode is None:
            self.returncode = self.proc.returncode

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def send(self, line: str) -> None:
        """A line on the child's stdin (children started with ``stdin=True`` wait for "go")."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The last line of stdout as JSON, after a successful exit."""
        code = self.wait(timeout_s)
        out = self.output().strip().splitlines()
        if code != 0 or not out:
            raise BenchError(f"{self.name} failed (exit {code}): {tail(self.log)}")
        data = json.loads(out[-1])
        assert isinstance(data, dict)
        return data


def await_result(main: Child, helpers: Sequence[Child], timeout_s: float) -> dict[str, Any]:
    """``main``'s result; fails at once (instead of at the timeout) when a helper dies first."""
    deadline = time.monotonic() + timeout_s
    while main.poll() is None:
        for h in helpers:
            code = h.poll()
            if code not in (None, 0):
                raise BenchError(f"{h.name} exited with {code} while {main.name} ran: {tail(h.log)}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return main.result(max(1.0, deadline - time.monotonic()))


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def spawn(
    name: str,
    args: Sequence[str],
    logdir: Path,
    env: dict[str, str],
    stdin: bool = False,
    argv0: Sequence[str] | None = None,
) -> Child:
    """``python ARGS`` (or ``ARGV0 ARGS``, e.g. under py-spy) with stdout and stderr in files under
    ``logdir`` (no pipe can fill up)."""
    logdir.mkdir(parents=True, exist_ok=True)
    log, out = logdir / f"{name}.log", logdir / f"{name}.out"
    with log.open("wb") as err, out.open("wb") as stdout:
        proc = subprocess.Popen(
            [*(argv0 or [sys.executable]), *args],
            stdout=stdout,
            stderr=err,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
    return Child(name, proc, log, out)


def mistnet_args(*args: str) -> list[str]:
    return ["-m", "mistnet.cli", *args]


def procs_args(*args: str) -> list[str]:
    return ["-m", "bench.procs", *args]


@contextmanager
def children() -> Iterator[list[Child]]:
    """Every child started inside is killed on the way out, whatever happened."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in started:
            c.kill()


def wait_ready(kids: Sequence[Child], timeout_s: float) -> None:
    """Until every child has printed ``ready`` (a child that exits first is a failure)."""
    deadline = time.monotonic() + timeout_s
    pending = list(kids)
    while pending:
        for c in list(pending):
            if "ready" in c.output().splitlines():
                pending.remove(c)
            elif c.poll() is not None:
                raise BenchError(f"{c.name} exited with {c.returncode} before it was ready: {tail(c.log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{[c.name for c in pending]} not ready within {timeout_s:.0f} s")
        time.sleep(0.05)


def write_job(spec: Any, path: Path) -> Path:
    """A native job file for ``spec`` (a :class:`common.jobspec.JobSpec`)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "MistNetJob", **spec.model_dump(mode="json", exclude_none=True)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# Memory ------------------------------------------------------------------------------------------


def vm_hwm(pid: int) -> int | None:
    """The kernel's RSS high-water mark of ``pid`` since its exec (``VmHWM``), in bytes; None when
    unavailable. Exact where sampling can miss a short peak, and unlike ``ru_maxrss`` it does not
    count the parent's pages a child had between fork and exec."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples the resident set size and CPU time of some processes every ``interval_s`` (psutil)
    in a thread: peak RSS per process (the kernel's high-water mark where Linux gives it, else the
    largest sample), and the CPU seconds each used between two instants."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self.sampled_peaks: dict[str, int] = {}
        self.samples: dict[str, list[tuple[float, int, float]]] = {}  # (time.time(), rss, cpu s)
        self._procs: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        with self._lock:
            self._procs[name] = proc
            self.peaks.setdefault(name, 0)
            self.sampled_peaks.setdefault(name, 0)
            self.samples.setdefault(name, [])
        self._sample(name, proc)

    def _sample(self, name: str, proc: psutil.Process) -> None:
        try:
            with proc.oneshot():
                rss = int(proc.memory_info().rss)
                cpu = proc.cpu_times()
                if proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(proc.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            with self._lock:
                self._procs.pop(name, None)
            return
        hwm = vm_hwm(proc.pid)
        with self._lock:
            self.sampled_peaks[name] = max(self.sampled_peaks[name], rss)
            self.peaks[name] = max(self.peaks[name], hwm if hwm is not None else rss)
            self.samples[name].append((time.time(), rss, float(cpu.user + cpu.system)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                procs = list(self._procs.items())
            for name, proc in procs:
                self._sample(name, proc)

    def cpu_between(self, name: str, t0: float, t1: float) -> float:
        """CPU seconds ``name`` used from ``t0`` to ``t1`` (time.time()), interpolated between samples."""
        points = self.samples.get(name, [])
        if not points:
            return 0.0

        def at(t: float) -> float:
            if t <= points[0][0]:
                return points[0][2]
            for (ta, _, ca), (tb, _, cb) in itertools.pairwise(points):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
            return points[-1][2]

        return max(0.0, at(t1) - at(t0))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


# Load ----------------------------------------------------------------------------------------------


@dataclass
class LoadRecord:
    """How busy the machine was: load averages and total CPU use sampled during the benchmark."""

    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    loadavg: list[float] = field(default_factory=list)
    cpu_percent: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> LoadRecord:
        psutil.cpu_percent(None)

        def run() -> None:
            while not self._stop.wait(5.0):
                self.loadavg.append(os.getloadavg()[0])
                self.cpu_percent.append(psutil.cpu_percent(None))

        self._thread = threading.Thread(target=run, name="load-record", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(6)
        load = self.loadavg or [os.getloadavg()[0]]
        return {
            "cpus": self.cpus,
            "loadavg_1min_median": round(median(load), 2),
            "loadavg_1min_max": round(max(load), 2),
            "cpu_percent_median": round(median(self.cpu_percent), 1) if self.cpu_percent else None,
        }


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    mosq = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if mosq:
        try:
            out = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=5).stdout
            info["mosquitto"] = out.splitlines()[0].strip() if out else mosq
        except (OSError, subprocess.SubprocessError):
            info["mosquitto"] = mosq
    return info


# Data ----------------------------------------------------------------------------------------------


def link_images(images: Sequence[Path], dest: Path, repeat: int = 1) -> Path:
    """A YOLO-layout folder (``images/``, ``labels/``) of symlinks to ``images``, each ``repeat``
    times under distinct names (``r{k}_NAME``): a bigger data set without copying a byte."""
    from common.datasets.yolo import img2label_path

    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for k in range(repeat):
        for image in images:
            name = f"r{k}_{image.name}" if repeat > 1 else image.name
            (dest / "images" / name).symlink_to(image.resolve())
            label = img2label_path(image)
            if label.is_file():
                (dest / "labels" / Path(name).with_suffix(".txt").name).symlink_to(label.resolve())
    return dest


def coco_images(limit: int | None = None) -> list[Path]:
    from common.datasets.yolo import discover_images

    if not COCO128.exists():
        raise BenchError(f"COCO128 not found at {COCO128} (the benchmarks read ../shared/data/coco128)")
    images = discover_images(COCO128)
    return images[:limit] if limit else images


# Context ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """One benchmark run: the profile, the device, a scratch folder and the broker everything uses."""

    profile: Any  # bench.profiles.Profile
    device: str
    workdir: Path
    broker_url: str
    log: Callable[[str], None]
    broker_pid: int | None = None
    _serial: int = 0

    def unique(self, prefix: str) -> str:
        """A fresh name for a job or node: runs never share retained messages or sessions."""
        self._serial += 1
        return f"{prefix}{self._serial}"

    @property
    def cpus(self) -> int:
        return os.cpu_count() or 1

    def timeout(self, key: str = "run") -> float:
        return float(self.profile.timeouts.get(key, 600.0))


def bench_broker(workdir: Path) -> Any:
    """The benchmarks' mosquitto (not yet started): private, on loopback, and with the deployed
    configuration's ``set_tcp_nodelay true`` (``broker/conf/mosquitto.conf``, ``broker init-auth``).
    Without it Nagle's algorithm holds a small message (a cloud acknowledgement) back behind the
    previous small packet to the same client until that client's delayed TCP ACK, ~40 ms later: a
    stall on every acknowledgement an edge waits for."""
    from broker.launcher import local_mosquitto

    broker = local_mosquitto(workdir)
    broker.config.write_text(broker.config.read_text() + "set_tcp_nodelay true\n")
    return broker


def cloud_command(ctx: Context, job: Path, name: str, *extra: str) -> list[str]:
    """``mistnet cloud`` arguments for a benchmark job: its own work directory, the run's broker."""
    return ["cloud", "--job", str(job), "--workdir", str(ctx.workdir / "cloud" / name), "--broker", ctx.broker_url,
            *extra]  # fmt: skip


def pyspy_command(spy: str, profile_dir: Path) -> list[str]:
    """The argv prefix that samples a Python process with py-spy into ``profile_dir``."""
    return [spy, "record", "-r", "100", "-f", "raw", "-o", str(profile_dir / "edge.pyspy.txt"), "--", sys.executable]
