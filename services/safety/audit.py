"""The audit trail: one JSON line per decision, durable (fsync) before the decision is answered.

Layout: a directory of segments `audit-<UTC start>-<pid>-<n>.jsonl`. One segment is open per process; it is
closed (fsync'd) and a new one started when it exceeds `max_segment_bytes` or `max_segment_seconds`, and at
exit. Segments left by an earlier process (also one killed mid-write) count as closed: a process never appends
to another's file.

Durability: `append()` returns only after the line is on disk (os.write of the whole line, then fsync), so a
decision that was answered is in the log whatever happens to the process afterwards. Concurrent appends share
fsyncs (group commit): a thread whose line was covered by another thread's fsync does not sync again.

A crash can leave a torn last line in a segment (written, not synced, never answered); readers skip it.

Shipping: `on_segment_closed(path)` runs off the request path, in a background thread, for every closed
segment without a `<segment>.shipped` marker (at start-up, too, for segments an earlier process left); when it
returns, the marker is written. The storage side (S3/MinIO upload) plugs in there; a failure is logged and
retried at the next rotation or start.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEGMENT_GLOB = "audit-*.jsonl"
SHIPPED_SUFFIX = ".shipped"


class AuditError(Exception):
    """The audit log cannot take a record: the decision must not be answered."""


class AuditLog:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_segment_bytes: int = 64 * 1024 * 1024,  # rotate after this many bytes
        max_segment_seconds: float = 3600.0,  # ... or at the first append after this long (shipping keeps up)
        on_segment_closed: Callable[[Path], None] | None = None,  # ship a closed segment (S3/MinIO upload)
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_seconds = max_segment_seconds
        self.on_segment_closed = on_segment_closed
        self._write_lock = threading.Lock()  # order of lines; the open segment
        self._sync_lock = threading.Lock()  # one fsync at a time; guards _fd against rotation
        self._written = 0  # lines written (os.write returned)
        self._synced = 0  # lines known to be on disk
        self._segment_index = 0
        self._fd = -1
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._closed = False
        self._ship_lock = threading.Lock()
        self._shipping: set[Path] = set()  # queued or being shipped (never twice at once)
        self._open_segment()
        self._ship_pending()

    # --- writing --------------------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Writes `record` as one line and returns when it is durable. Raises AuditError if it cannot."""
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode(
            "utf-8"
        )
        try:
            with self._write_lock:
                if self._closed:
                    raise AuditError("the audit log is closed")
                if self._size and (
                    self._size + len(line) > self.max_segment_bytes
                    or time.monotonic() - self._opened_at > self.max_segment_seconds
                ):
                    self._rotate()
                _write_all(self._fd, line)
                self._size += len(line)
                self._written += 1
                mine = self._written
            with self._sync_lock:
                if self._synced < mine:  # else another thread's fsync already covered this line
                    target = self._written
                    os.fsync(self._fd)
                    self._synced = max(self._synced, target)
        except OSError as error:
            raise AuditError(f"cannot write the audit log {self._path}: {error}") from error

    @property
    def current_segment(self) -> Path | None:
        return self._path

    def rotate(self) -> None:
        """Closes the open segment (and ships it) and starts a new one."""
        with self._write_lock:
            self._rotate()

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._sync_lock:
                self._close_fd()
            if self._size == 0 and self._path is not None:
                self._path.unlink(missing_ok=True)  # nothing was decided: no segment to keep or ship
            self._path = None  # the last segment is closed too: ship it
        self._ship_pending()

    # --- segments -------------------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._segment_index += 1
        self._path = self.directory / f"audit-{stamp}-{os.getpid()}-{self._segment_index:04d}.jsonl"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        _fsync_dir(self.directory)  # the new file's name must survive a crash too
        self._opened_at = time.monotonic()
        self._size = 0

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            self._synced = self._written
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:  # holds _write_lock
        with self._sync_lock:
            self._close_fd()
            self._open_segment()
        self._ship_pending()

    def closed_segments(self) -> list[Path]:
        return sorted(p for p in self.directory.glob(SEGMENT_GLOB) if p != self._path)

    def _ship_pending(self) -> None:
        if self.on_segment_closed is None:
            return
        with self._ship_lock:
            pending = [
                p
                for p in self.closed_segments()
                if p not in self._shipping and not p.with_name(p.name + SHIPPED_SUFFIX).exists()
            ]
            self._shipping.update(pending)
        if pending:
            threading.Thread(target=self._ship, args=(pending,), name="audit-ship", daemon=True).start()

    def _ship(self, segments: list[Path]) -> None:
        assert self.on_segment_closed is not None
        for segment in segments:
            try:
                self.on_segment_closed(segment)
                segment.with_name(segment.name + SHIPPED_SUFFIX).touch()
            except Exception:  # retried at the next rotation or start
                log.exception("shipping audit segment %s failed", segment)
            finally:
                with self._ship_lock:
                    self._shipping.discard(segment)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading ------------------------------------------------------------------------------------------------
def read_records(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record of every segment, oldest segment first; a torn (unsynced, unanswered) line is skipped."""
    for segment in sorted(Path(directory).glob(SEGMENT_GLOB)):
        with open(segment, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn tail of a killed writer: its request was never answered
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    log.warning("skipping a malformed line in %s", segment)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
