"""glibc's allocator tuned for the cloud's receive path (a process-wide setting, for its launcher).

Every chunk payload and every joined transfer is a transient buffer of hundreds of KiB to a few MiB.
With glibc's defaults such a buffer is mapped and unmapped (or the heap top trimmed) as soon as it is
freed, so the next one starts on fresh pages the kernel must fault in and zero. Keeping freed memory
for reuse (larger buffers than the mmap threshold are still mapped; up to the trim threshold stays in
the heap) cut the cloud's CPU per MB received by about a sixth on the transport benchmark
(``docs/benchmarks.md``). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("mistnet.cloud")

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def reuse_large_buffers() -> bool:
    """True when glibc took the setting."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and done
    log.debug("malloc tuned for large transient buffers: %s", done)
    return done
