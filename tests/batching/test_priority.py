"""Priority classes in the step batcher (no model; a stage whose step sleeps per row):
interactive work is admitted first and steps without batch rows beside it, batch work keeps moving (ageing,
one iteration in BATCH_EVERY) and ends; each request's compute seconds add up to the stage's busy time."""

from __future__ import annotations

import time
from dataclasses import dataclass

from unclip.batching.batcher import BATCH_EVERY, BatcherConfig, StepBatcher

ROW_SECONDS = 0.004


@dataclass
class Task:
    total: int
    rows: int = 1
    steps_done: int = 0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total


class SleepyStage:
    """step() costs ROW_SECONDS per row, as a CPU forward pass grows with its batch."""

    name = "sleepy"

    def __init__(self) -> None:
        self.busy = 0.0

    def key(self, task: Task) -> int:
        return 0

    def step(self, tasks: list[Task]) -> int:
        began = time.perf_counter()
        time.sleep(ROW_SECONDS * sum(t.rows for t in tasks))
        for task in tasks:
            task.steps_done += 1
        self.busy += time.perf_counter() - began
        return sum(t.rows for t in tasks)

    def finish(self, task: Task) -> Task:
        return task


def test_interactive_first_batch_held_back_and_never_starved():
    stage = SleepyStage()
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=8, max_queue_size=64, first_step_delay_s=0.0))
    try:
        batch = [batcher.submit(Task(total=40, rows=2), batch=True) for _ in range(4)]  # fills the batch
        time.sleep(0.05)
        started = time.monotonic()
        interactive = batcher.submit(Task(total=20, rows=2))
        interactive.result(timeout=30)
        interactive_seconds = time.monotonic() - started
        for ticket in batch:
            assert ticket.result(timeout=60).done  # batch work ends: held back, never starved
        # The interactive request was admitted at once (a batch ticket paused for it) and most of its steps
        # ran without batch rows: ~20 steps x 2 rows alone, plus one in BATCH_EVERY shared.
        alone = 20 * 2 * ROW_SECONDS
        assert interactive_seconds < alone + 20 / BATCH_EVERY * 8 * ROW_SECONDS + 0.5, interactive_seconds
        assert interactive.compute_seconds > 0
        # Usage: every step's time split over its requests adds up to the stage's busy time.
        total = interactive.compute_seconds + sum(t.compute_seconds for t in batch)
        assert abs(total - stage.busy) <= 0.02 * stage.busy + 0.01, (total, stage.busy)
    finally:
        batcher.close()


def test_batch_alone_uses_the_whole_stage():
    stage = SleepyStage()
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=8, max_queue_size=64, first_step_delay_s=0.0))
    try:
        tickets = [batcher.submit(Task(total=10, rows=2), batch=True) for _ in range(4)]
        for ticket in tickets:
            ticket.result(timeout=30)
        assert all(t.compute_seconds > 0 for t in tickets)
    finally:
        batcher.close()
