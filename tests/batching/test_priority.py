"""Priority classes in the step batcher (no model; a stage whose step sleeps per row):
interactive work is admitted first and steps without batch rows beside it; batch rows also pause while the
stack-wide hold is on (the orchestrator's BatchHold); ageing lets a paused batch request go after
max_hold_s, so it ends; each request's compute seconds add up to the stage's busy time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from unclip.batching.batcher import BatcherConfig, StepBatcher
from unclip.batching.hold import HoldState

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
    busy: list[float] = []
    config = BatcherConfig(max_batch_size=8, max_queue_size=64, first_step_delay_s=0.0, max_hold_s=30.0)
    batcher = StepBatcher(stage, config, on_busy=busy.append)
    try:
        batch = [batcher.submit(Task(total=40, rows=2), batch=True) for _ in range(4)]  # fills the batch
        time.sleep(0.05)
        started = time.monotonic()
        interactive = batcher.submit(Task(total=20, rows=2))
        interactive.result(timeout=30)
        interactive_seconds = time.monotonic() - started
        for ticket in batch:
            assert ticket.result(timeout=60).done  # batch work ends: held back, never starved
        # The interactive request was admitted at once (a batch ticket paused for it) and its steps ran
        # without batch rows: 20 steps x 2 rows alone.
        alone = 20 * 2 * ROW_SECONDS
        assert interactive_seconds < alone + 0.5, interactive_seconds
        assert interactive.compute_seconds == pytest.approx(alone, rel=0.5)
        assert any(t.held_seconds > 0 for t in batch)  # (the one moved back to the queue waited there)
        # Usage: every step's time split over its requests adds up to the stage's busy time, and to what the
        # batcher reported as busy (the metrics counter).
        total = interactive.compute_seconds + sum(t.compute_seconds for t in batch)
        assert abs(total - stage.busy) <= 0.02 * stage.busy + 0.01, (total, stage.busy)
        assert abs(sum(busy) - total) <= 0.02 * total + 0.01, (sum(busy), total)
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


def test_stack_wide_hold_pauses_batch_rows_between_steps():
    """The hold (what the orchestrator sets while interactive work is elsewhere in the stack) stops batch
    steps here although no interactive request is in this stage; released, they go on and end."""
    stage, hold = SleepyStage(), HoldState()
    config = BatcherConfig(max_batch_size=8, max_queue_size=64, first_step_delay_s=0.0, max_hold_s=30.0)
    batcher = StepBatcher(stage, config, hold=hold.held)
    try:
        assert hold.set("orchestrator:test", 1, 5.0)
        ticket = batcher.submit(Task(total=10, rows=2), batch=True)
        time.sleep(0.3)
        assert ticket.task.steps_done == 0 and not ticket.done()
        assert hold.set("orchestrator:test", 0, 0.0)  # an older release arriving late changes nothing
        assert hold.held() and ticket.task.steps_done == 0
        assert not hold.set("orchestrator:test", 2, 0.0)  # released
        assert ticket.result(timeout=30).done
        assert ticket.held_seconds >= 0.25
    finally:
        batcher.close()


def test_ageing_a_batch_request_is_paused_at_most_max_hold_s():
    stage, hold = SleepyStage(), HoldState()
    config = BatcherConfig(max_batch_size=8, max_queue_size=64, first_step_delay_s=0.0, max_hold_s=0.3)
    batcher = StepBatcher(stage, config, hold=hold.held)
    try:
        hold.set("orchestrator:test", 1, 60.0)  # never released
        began = time.monotonic()
        ticket = batcher.submit(Task(total=10, rows=2), batch=True)
        assert ticket.result(timeout=30).done
        assert 0.3 <= time.monotonic() - began < 5.0
        assert ticket.held_seconds == pytest.approx(0.3, abs=0.1)  # paused until its age_at, then it ran
    finally:
        batcher.close()


def test_hold_state_refuses_bad_leases():
    hold = HoldState()
    with pytest.raises(ValueError, match="seconds"):
        hold.set("a", 1, 61.0)
    with pytest.raises(ValueError, match="seconds"):
        hold.set("a", 1, float("nan"))
    with pytest.raises(ValueError, match="holder"):
        hold.set("", 1, 1.0)
    assert hold.set("a", 1, 0.05) and hold.held()
    time.sleep(0.1)
    assert not hold.held()  # a lease lapses by itself


def test_orchestrator_gate_holds_the_stages_while_interactive_work_is_in_flight():
    """PriorityGate against a real BatchHold server: the hold is set when an interactive request is admitted,
    outlasts it by the linger, and is released; a batch request's stage call waits meanwhile, at most until
    its ageing deadline."""
    from concurrent import futures

    import grpc

    from services.orchestrator.priority import LINGER_S, PriorityGate
    from unclip.runtime.hold import BatchHoldServicer
    from unclip.v1 import hold_pb2_grpc

    state = HoldState()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    hold_pb2_grpc.add_BatchHoldServicer_to_server(BatchHoldServicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    gate = PriorityGate(lambda: [("stage", hold_pb2_grpc.BatchHoldStub(channel))], max_hold_s=5.0)
    try:
        assert gate.wait_clear(1.0) < 0.05  # nothing interactive: a batch call goes at once
        with gate.interactive():
            until = time.monotonic() + 5
            while not state.held() and time.monotonic() < until:
                time.sleep(0.01)
            assert state.held()
            assert 0.2 <= gate.wait_clear(0.2) < 1.0  # ageing: waits no longer than it may
        waited = gate.wait_clear(5.0)  # the linger, then the batch call goes
        assert LINGER_S - 0.1 <= waited < LINGER_S + 1.0, waited
        until = time.monotonic() + 5
        while state.held() and time.monotonic() < until:
            time.sleep(0.01)
        assert not state.held()  # released
        with gate.interactive(active=False):  # a batch request holds nothing
            assert gate.interactive_in_flight == 0 and gate.wait_clear(1.0) < 0.05
    finally:
        channel.close()
        server.stop(None)
