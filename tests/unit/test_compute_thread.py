"""One compute thread per stage process (unclip.runtime.threads): request threads run torch on one thread
(no OpenMP team of their own), the batcher's thread at the policy's count. Idle teams beyond the CPU count
make libgomp sleep and wake at every parallel region of the compute thread (BENCHMARKS.md)."""

from __future__ import annotations

import threading
from concurrent import futures

import torch

from unclip.runtime.slots import ThreadedStage
from unclip.runtime.threads import ThreadPolicy, single_threaded


class Recorder:
    """A stage that notes the calling thread's torch thread count in start, step and finish."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def start(self) -> str:
        self.seen["start"] = torch.get_num_threads()
        return "task"

    def step(self, tasks: list) -> int:
        self.seen["step"] = torch.get_num_threads()
        return 1

    def finish(self, task: str) -> str:
        self.seen["finish"] = torch.get_num_threads()
        return task


def in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_start_is_single_threaded_steps_and_finish_follow_the_policy():
    before = torch.get_num_threads()
    try:
        stage = Recorder()
        threaded = ThreadedStage(stage, ThreadPolicy(pinned=2))
        in_thread(threaded.start)  # a request's thread
        in_thread(lambda: (threaded.step(["task"]), threaded.finish("task")))  # the batcher's
        assert stage.seen == {"start": 1, "step": 2, "finish": 2}
    finally:
        torch.set_num_threads(before)


def test_server_request_threads_start_single_threaded():
    # What unclip.runtime.server gives grpc.server: a pool whose threads run single_threaded first.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the process's last setting, which a new thread inherits
        assert in_thread(torch.get_num_threads) == 2
        with futures.ThreadPoolExecutor(max_workers=2, initializer=single_threaded) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)
