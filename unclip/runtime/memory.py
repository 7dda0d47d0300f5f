"""What a long-running service process does so memory freed after a large request goes back to the OS.

glibc's malloc keeps freed memory for reuse: each thread that allocates may get its own arena (up to 8 per
core), and its mmap threshold rises to the size of the last large block freed (up to 32 MB), after which
blocks of that size come from the arenas and stay there once freed. A service whose requests carry tensors
or decoded images of varying sizes on many server threads therefore holds its peak (an encoder went from
427 to 818 MB after a fuzzing run and stayed there). `bound_allocator` fixes the threshold (large blocks are
mmapped and unmapped when freed) and caps the arenas; `trim` hands free heap pages back, and `serve` calls it
after busy periods. Linux/glibc only; elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# Blocks from this size up are mmapped: a request's tensors and images, never the many small objects.
MMAP_THRESHOLD_BYTES = 1024 * 1024
# Arenas per process: enough for the few threads that allocate at once; fewer arenas hold less free memory.
ARENA_MAX = 2
# Free memory at the top of a heap beyond this is returned at once (glibc's default is 128 KiB, but a fixed
# mmap threshold also fixes this one at its default; keep it explicit).
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt  # noqa: B018 (musl has no mallopt: not glibc)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def bound_allocator() -> bool:
    """Sets the thresholds above; call it first thing in a process (arenas already made stay). True when
    applied."""
    libc = _libc()
    if libc is None:
        return False
    applied = all(
        libc.mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not applied:
        log.warning("mallopt refused a setting: memory freed after large requests may be held")
    return applied


def trim() -> None:
    """Returns free heap memory to the OS (malloc_trim(0): also whole free pages inside the heaps)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
