"""Stopping as containers and service managers ask: SIGTERM unwinds like Ctrl-C, and children never
outlive the process that started them.

* :func:`sigterm_as_interrupt` - a context manager: SIGTERM raises :class:`Terminated` (a
  ``KeyboardInterrupt``) in the main thread, so every ``finally`` and ``except KeyboardInterrupt``
  that saves state or stops children on Ctrl-C runs on SIGTERM too. ``mistnet.cli.main`` wraps every
  command in it; :func:`interrupt_exit_code` gives the shell's exit status (130 or 143).
* :func:`spawn` - ``subprocess.Popen`` for a child that dies with its launcher even when the
  launcher is killed outright (SIGKILL, OOM): on Linux the child asks the kernel for SIGTERM when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``). Elsewhere only the launcher's own clean-up (on
  Ctrl-C or SIGTERM) stops its children.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise ``KeyboardInterrupt``."""


class _Held:
    """A SIGTERM that arrived inside :func:`sigterm_held`, to be raised when it ends."""

    active = False
    pending: Terminated | None = None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (once: a second SIGTERM
    while cleaning up is ignored, so it cannot cut the clean-up short). Off the main thread, where
    Python cannot install handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exc = Terminated(f"signal {signal.Signals(signum).name}")
        if _Held.active:
            _Held.pending = exc
            return
        raise exc

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports it: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking for SIGTERM when the parent dies; None off Linux or without libc.
    Resolved before the fork, so the child runs no import or lookup between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return die_with_parent


@contextmanager
def sigterm_held() -> Iterator[None]:
    """On the main thread, a SIGTERM that arrives within the block is raised as it ends, for short
    steps that must not be cut in the middle: after a fork with a ``preexec_fn`` Python runs at-fork
    callbacks (logging's lock release) and drops what a signal handler raises inside them, so the
    process would run on as if never asked to stop; a paho client interrupted while it is built
    prints a traceback when it is collected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.active = True
    try:
        yield
    finally:
        _Held.active = False
        pending, _Held.pending = _Held.pending, None
        if pending is not None:
            raise pending


def spawn(args: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **options)`` for a child that must not outlive this process.

    The kernel signals the child when the *thread* that forked it ends, so the death signal is only
    asked for on the main thread (whose end is the process's); a child started from another thread
    relies on the launcher's clean-up alone."""
    setter = _pdeathsig_setter() if threading.current_thread() is threading.main_thread() else None
    if setter is None:
        return subprocess.Popen(args, **options)
    with sigterm_held():
        return subprocess.Popen(args, preexec_fn=setter, **options)
