"""How many torch threads a model stage computes with: the stack's choice, not the user's.

- The budget is the CPUs this process may use: the cgroup's CPU limit (``cpu.max`` in cgroup v2,
  ``cpu.cfs_quota_us / cpu.cfs_period_us`` in v1: a Kubernetes pod's ``resources.limits.cpu``), else the CPUs
  the process is allowed to run on (``sched_getaffinity``).
- ``UNCLIP_TORCH_THREADS`` N > 0 pins N threads (bit-reproducible across load); 0 (the default) is automatic:
  before each denoising step the stage takes the budget's idle CPUs — every core when it is alone on an idle
  machine (one request walking the stages one after another), fewer when other stages or processes are
  running (``/proc/loadavg``'s count of runnable threads), at least one.
- One compute thread per process runs multi-threaded: the stage's batcher (steps and finish). libgomp
  keeps a team of worker threads for every OS thread that ran a parallel region, for as long as that thread
  lives, and once a process's teams hold more threads than there are CPUs it stops spinning between
  parallel regions: every region then pays a futex wake-up. With three idle request threads' teams beside
  it, a decoder step took 70 ms instead of 51 ms (2 cores). Request threads (the gRPC pool: parsing,
  ``start``'s conditioning and initial noise, answers) and the loader therefore run torch on one thread
  (``single_threaded``), which makes no team.
- OpenMP keeps the thread count per OS thread, and a thread that never set it starts at torch's last
  setting or OpenMP's default: ``ThreadPolicy.apply`` is called on the compute thread before every step,
  ``single_threaded`` on every other thread before its first torch work.

A step's float rounding can depend on the thread count; automatic threads therefore trade bit-exact
repeatability across load levels for speed (outputs stay within the batch-drift bounds of docs/interfaces.md).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU limit in CPUs (e.g. 1.5), or None when there is none (``max``) or no cgroup."""
    try:
        quota, period = (
            (root / "cpu.max").read_text().split()[:2]
        )  # cgroup v2: "max 100000" | "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_budget(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the cgroup limit rounded up, capped by the CPUs it may run on."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return max(1, min(allowed, math.ceil(limit)) if limit is not None else allowed)


def runnable_threads(path: str = "/proc/loadavg") -> int | None:
    """Threads runnable right now, machine-wide (the 4th field of /proc/loadavg, "running/total"), the
    caller included; None where the file does not exist."""
    try:
        with open(path) as file:
            return int(file.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ThreadPolicy:
    """Threads for one stage process (see the module docstring)."""

    pinned: int = 0  # UNCLIP_TORCH_THREADS: N > 0 threads always, 0 automatic
    budget: int = 0  # CPUs this process may use (0: cpu_budget())

    def __post_init__(self) -> None:
        if self.pinned < 0:
            raise ValueError(f"--torch-threads must be >= 0 (0: automatic), got {self.pinned}")
        self.budget = self.budget or cpu_budget()

    def threads_now(self) -> int:
        """The thread count for the next piece of work."""
        if self.pinned:
            return self.pinned
        running = runnable_threads()
        if running is None:
            return self.budget
        import torch

        # this process's own threads may still be runnable (OpenMP workers spin a moment after a step)
        busy_elsewhere = max(0, running - torch.get_num_threads())
        return max(1, min(self.budget, self.budget - busy_elsewhere))

    def apply(self) -> int:
        """Sets the calling thread's torch (OpenMP) thread count to ``threads_now()``; returns it."""
        import torch

        threads = self.threads_now()
        torch.set_num_threads(threads)
        return threads


def single_threaded() -> None:
    """Runs the calling thread's torch work on one thread (no OpenMP team of its own; see the module
    docstring). A no-op in a process that has not imported torch (the gateway, a torch-free orchestrator)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def policy_from_setting(torch_threads: int) -> ThreadPolicy:
    """The policy for the ``--torch-threads`` / UNCLIP_TORCH_THREADS value (0: automatic)."""
    return ThreadPolicy(pinned=torch_threads)
