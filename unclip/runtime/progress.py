"""Server-streaming twins of the denoising stages' unary methods: the same work, reported step by step.

`stream_progress(work, progress_event, output_event)` runs `work(on_accepted, on_step)` (the unary method's
body with the batcher's hooks) on a helper thread and yields a progress event when the request is accepted
(with its queue position), one after every denoising step, then the output. An error ends the stream with
the status the unary method would answer (the caller wraps the method in `grpc_stream_errors`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from unclip.runtime.errors import RequestCancelled
from unclip.v1 import progress_pb2

log = logging.getLogger(__name__)


def stream_progress(
    work: Callable[[Callable[[int, int], None], Callable[[int, int], None]], Any],
    progress_event: Callable[[progress_pb2.StageProgress], Any],
    output_event: Callable[[Any], Any],
    name: str = "stream",
) -> Iterator[Any]:
    events: queue.Queue = queue.Queue()  # bounded by the steps of one request

    def on_accepted(queue_position: int, total: int) -> None:
        events.put(("progress", progress_pb2.StageProgress(queue_position=queue_position, total=total)))

    def on_step(step: int, total: int) -> None:
        events.put(("progress", progress_pb2.StageProgress(step=step, total=total)))

    def run() -> None:
        try:
            events.put(("output", work(on_accepted, on_step)))
        except BaseException as error:  # re-raised on the handler's thread, mapped to a status there
            if isinstance(error, RequestCancelled):
                # Logged here: once the caller is gone, gRPC stops iterating the handler, which never sees it.
                log.info("%s stopped: %s", name, error)
            events.put(("error", error))

    threading.Thread(target=run, name="stream-work", daemon=True).start()
    while True:
        kind, value = events.get()
        if kind == "progress":
            yield progress_event(value)
        elif kind == "output":
            yield output_event(value)
            return
        else:
            raise value
