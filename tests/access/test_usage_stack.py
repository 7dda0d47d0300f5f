"""Usage against the stages' own busy time, and priority classes under load, on a small stack of real
processes (`unclip.stack.Stack`, tiny model, API keys and mTLS on) whose stages serve their metrics.

- Usage: over a run, the compute seconds the responses charge each stage add up (within 10 %) to that stage
  process's `unclip_busy_seconds` counter (the seconds its engine worked: every denoising step, each
  request's preparation and finish).
- Priority: with a batch key saturating the stack, an interactive key's latency stays close to its idle
  latency (the orchestrator holds batch requests between stage calls and the stages pause batch rows while
  interactive work is in flight), and the batch clients still complete requests.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from unclip.access import keys
from unclip.access.client import with_key
from unclip.runtime.server import create_channel
from unclip.stack import Stack
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

DENOISING = ("prior", "decoder", "super_res")
# Every stage that reports compute: the denoising ones, the encoder (its share of each batched forward pass)
# and safety (each check).
CHARGED = ("encoder", *DENOISING, "safety")
STEPS = pb.SamplingParams(
    prior_num_inference_steps=6, decoder_num_inference_steps=8, super_res_num_inference_steps=[4]
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MeteredStack(Stack):
    """The local stack with each process's metrics endpoint on a free port (`metrics_ports[name]`)."""

    def _process(self, name, module, *args, port=0):
        process = super()._process(name, module, *args, port=port)
        index = process.argv.index("--metrics-port") + 1
        self.metrics_ports[name] = _free_port()
        process.argv[index] = str(self.metrics_ports[name])
        return process


def _busy(stack: MeteredStack) -> dict[str, float]:
    """Each stage's unclip_busy_seconds_total, scraped from its metrics endpoint."""
    seconds = {}
    for name in CHARGED:
        url = f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        seconds[name] = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "unclip_busy_seconds_total"
        )
    return seconds


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    from unclip.tiny import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("usage-stack") / "model")
    stack = MeteredStack(
        model=str(model),
        port=0,
        grace_seconds=5.0,
        extra_env={"UNCLIP_MAX_INFLIGHT_PER_CALLER": "16", "UNCLIP_BATCH_MAX_HOLD_S": "10"},
    )
    stack.metrics_ports = {}
    stack.start(timeout=300)
    try:
        yield stack
    finally:
        stack.stop()


def _stub(stack: Stack, key: str):
    return orchestrator_pb2_grpc.ImageServiceStub(with_key(create_channel(stack.address), key))


def test_usage_adds_up_to_each_stages_busy_time(metered):
    key = keys.create(metered.keys_file, "usage-busy", tenant="usage-busy")
    client = _stub(metered, key)
    before = _busy(metered)
    charged = dict.fromkeys(CHARGED, 0.0)
    lock = threading.Lock()

    def send(i: int) -> None:  # concurrent, so steps are shared and split between requests
        request = pb.GenerateRequest(prompt=f"a red circle {i}", n=1 + i % 2, seed=i, params=STEPS)
        usage = client.Generate(request, timeout=300).usage
        with lock:
            for stage, seconds in usage.stage_seconds.items():
                charged[stage] += seconds

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    busy = {name: _busy(metered)[name] - before[name] for name in CHARGED}
    for name in CHARGED:
        assert busy[name] > 0, busy
        assert abs(charged[name] - busy[name]) <= 0.10 * busy[name], (name, charged, busy)


def _latency(client, samples: int) -> list[float]:
    seconds = []
    for i in range(samples):
        began = time.perf_counter()
        client.Generate(pb.GenerateRequest(prompt="a blue square", seed=100 + i, params=STEPS), timeout=300)
        seconds.append(time.perf_counter() - began)
    return seconds


def test_interactive_latency_stays_near_idle_under_batch_load(metered):
    interactive = _stub(metered, keys.create(metered.keys_file, "product", tenant="product"))
    batch_key = keys.create(metered.keys_file, "nightly", tenant="jobs", priority="batch")
    _latency(interactive, 1)  # warm
    idle = statistics.median(_latency(interactive, 5))

    stop = threading.Event()
    done = {"ok": 0, "other": 0}
    lock = threading.Lock()

    def load(index: int) -> None:
        client = _stub(metered, batch_key)
        seed = 1000 * (index + 1)
        while not stop.is_set():
            seed += 1
            try:
                request = pb.GenerateRequest(prompt="a green star", seed=seed, params=STEPS)
                client.Generate(request, timeout=300)
                outcome = "ok"
            except grpc.RpcError:  # RESOURCE_EXHAUSTED at admission: back off as a client would
                outcome = "other"
                time.sleep(0.2)
            with lock:
                done[outcome] += 1

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)  # the load fills every stage
        with lock:
            before = done["ok"]
        loaded = statistics.median(_latency(interactive, 5))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    # Measured on the shared 2-core machine (load ~10): without the stack-wide hold 2.7 (5.7 s vs 2.1 s),
    # with it 0.6 (1.9 s vs 3.1 s: the idle figure is the noisier one there).
    assert loaded <= 1.6 * idle + 0.2, (loaded, idle)
    assert done["ok"] > before, done  # batch work still completes (held back, never starved)
