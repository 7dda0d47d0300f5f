"""The idle stage's wait before its first step (UNCLIP_STEP_QUEUE_DELAY_MS, BatcherConfig.first_step_delay_s).

With step-level batching a request arriving while another runs joins at the next step, so the services start
a lone request at once (default 0); `first_step_delay_s=None` keeps `max_queue_delay_s` as the wait, and a
positive delay still lets concurrent arrivals share the first step. The batcher is torch-free: a counting
stage of one step per unit of `rows` stands in for an engine (the engines' steps are tested in
test_step_batching.py).
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass

from unclip.batching.batcher import BatcherConfig, StepBatcher
from unclip.runtime import settings
from unclip.runtime.server import BATCHING_SETTINGS, batcher_config


@dataclass(eq=False)
class Task:
    rows: int = 1
    total: int = 3
    steps_done: int = 0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total


class CountingStage:
    """Records which tasks shared each forward pass."""

    name = "counting"

    def __init__(self) -> None:
        self.passes: list[list[Task]] = []

    def key(self, task: Task) -> int:
        return 0

    def step(self, tasks: list[Task]) -> None:
        self.passes.append(list(tasks))
        for task in tasks:
            task.steps_done += 1

    def finish(self, task: Task) -> int:
        return task.steps_done


def started_after(config: BatcherConfig) -> float:
    batcher = StepBatcher(CountingStage(), config)
    try:
        began = time.monotonic()
        ticket = batcher.submit(Task())
        assert ticket.result(timeout=10) == 3
        return ticket.started_at - began
    finally:
        batcher.close()


def test_a_lone_request_starts_at_once_with_no_first_step_delay():
    # max_queue_delay_s is the request-level batchers' delay; it does not hold a step-level stage back.
    assert started_after(BatcherConfig(max_queue_delay_s=5.0, first_step_delay_s=0.0)) < 1.0


def test_without_first_step_delay_the_max_queue_delay_applies():
    assert started_after(BatcherConfig(max_queue_delay_s=0.3, first_step_delay_s=None)) >= 0.3


def test_a_first_step_delay_lets_concurrent_arrivals_share_the_first_step():
    stage = CountingStage()
    batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0, first_step_delay_s=0.5))
    try:
        tickets = []
        threads = [threading.Thread(target=lambda: tickets.append(batcher.submit(Task()))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [t.result(timeout=10) for t in tickets] == [3, 3]
        assert len(stage.passes[0]) == 2 and len(stage.passes) == 3
    finally:
        batcher.close()


def test_the_services_take_the_step_delay_from_its_own_setting(monkeypatch):
    for name in ("UNCLIP_STEP_QUEUE_DELAY_MS", "UNCLIP_MAX_QUEUE_DELAY_MS", "UNCLIP_MAX_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, [*BATCHING_SETTINGS, "max_workers"])
    config = batcher_config(parser.parse_args([]))
    assert config.first_step_delay_s == 0.0 and config.max_queue_delay_s == 0.002
    config = batcher_config(parser.parse_args(["--step-queue-delay-ms", "7"]))
    assert config.first_step_delay_s == 0.007
