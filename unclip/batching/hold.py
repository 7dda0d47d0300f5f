"""Stack-wide hold of batch-priority work: the state a denoising stage keeps of who asks it to hold its batch
rows back, and nothing else (torch-free and grpc-free; ``unclip.runtime.hold`` serves it as the
``BatchHold.Hold`` RPC, ``StepBatcher`` reads it through the ``hold`` callable it is given).

Why: on a small machine every stage shares the same cores. Holding batch rows back only in the stage where
an interactive request is does not stop the other stages' batch steps from taking those cores while the
interactive request is elsewhere in the chain. The orchestrator knows when interactive requests are in flight
and tells every denoising stage; each stage pauses its batch rows between steps until told otherwise.

Rules: a hold is a lease (``seconds``), renewed by its holder while it needs it, released with 0; a holder
that dies stops pausing batch work when its lease lapses. Each holder numbers its calls (``sequence``); a call
older than the last one seen from that holder is ignored, so a release and the next hold can travel on
separate calls without a late release undoing the hold.
"""

from __future__ import annotations

import threading
import time

MAX_LEASE_SECONDS = 60.0  # a longer lease is refused: a holder must renew, so one that dies lets go soon
MAX_HOLDER_CHARS = 128


class HoldState:
    """Who holds batch work back in this process, and until when."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # holder -> time.monotonic() the lease lapses
        self._sequence: dict[str, int] = {}  # holder -> last sequence applied

    def set(self, holder: str, sequence: int, seconds: float) -> bool:
        """Applies one holder's call (seconds > 0: hold that long from now; 0: release); returns held()."""
        if not 1 <= len(holder) <= MAX_HOLDER_CHARS:
            raise ValueError(f"holder must have 1..{MAX_HOLDER_CHARS} characters, got {len(holder)}")
        if not 0.0 <= seconds <= MAX_LEASE_SECONDS:  # also refuses NaN
            raise ValueError(f"seconds must be in 0..{MAX_LEASE_SECONDS:g}, got {seconds}")
        now = time.monotonic()
        with self._lock:
            if sequence >= self._sequence.get(holder, -1):
                self._sequence[holder] = sequence
                if seconds > 0:
                    self._until[holder] = now + seconds
                else:
                    self._until.pop(holder, None)
            # Lapsed holders are forgotten (their sequences too: a holder that comes back starts again).
            for name in [h for h, until in self._until.items() if until <= now]:
                del self._until[name]
            if len(self._sequence) > 4 * MAX_HOLDER_CHARS:  # bounded however many holders came and went
                self._sequence = {h: s for h, s in self._sequence.items() if h in self._until or h == holder}
            return bool(self._until)

    def held(self) -> bool:
        """Whether any holder's lease is running now (what the step batcher asks between steps)."""
        now = time.monotonic()
        with self._lock:
            return any(until > now for until in self._until.values())


# The hold of this process: a stage process runs one step batcher per stage and serves one BatchHold.
STAGE_HOLD = HoldState()
