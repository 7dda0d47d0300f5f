"""What a long-running service process does so memory freed after a large request goes back to the OS.

glibc's malloc keeps freed memory for reuse: each thread that allocates may get its own arena (up to 8 per
core), and its mmap threshold rises to the size of the last large block freed (up to 32 MB), after which
blocks of that size come from the arenas and stay there once freed. A service whose requests carry tensors
or decoded images of varying sizes on many server threads therefore holds its peak (an encoder went from
427 to 818 MB after a fuzzing run and stayed there). `bound_allocator` caps the arenas and fixes the
thresholds; `trim` hands free heap pages back, and `serve` calls it every few seconds, so memory follows the
load down without every allocation paying for it.

The thresholds are high on purpose: a denoising step allocates and frees many 1-30 MB activations. Blocks
mmapped one by one (a 1 MiB threshold) are unmapped when freed and page-faulted and zeroed again on the next
step: a stage then spent a third of its CPU in the kernel and computed 1.6x slower than the same engine in
one process (benchmarks.latency, n=4). From the arenas they are reused; the periodic trim returns them.
Linux/glibc only; elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# Blocks from this size up are mmapped (glibc's largest allowed value, 32 MiB on 64-bit): a step's
# activations are reused from the arenas; only blocks larger than any step's are mapped and unmapped.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Arenas per process: enough for the few threads that allocate at once; fewer arenas hold less free memory.
ARENA_MAX = 2
# Free memory at the top of a heap beyond this is returned at once; below it, the periodic trim returns it
# (returning it on every free() would page-fault it back on the next step).
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

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
