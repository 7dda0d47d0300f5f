"""Request-level dynamic batching of the encoder with the real engine: concurrent requests share one forward
pass and get what they get alone (exactly for a request alone or deterministic, within rounding otherwise)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from unclip.batching.batcher import BatcherConfig, QueueFull
from unclip.batching.dynamic import DynamicBatcher


def test_concurrent_text_requests_share_a_forward_pass(engines):
    encoder = engines.encoder
    requests = [["a red circle"], ["a blue square", "a green triangle"], ["x" * 300]]
    alone = [encoder.encode_text(prompts, True) for prompts in requests]
    batches: list[int] = []

    def run_batch(batch):
        batches.append(len(batch))
        return encoder.encode_text_batch([p for p, _ in batch], batch[0][1])

    # Triton's window: the oldest request waits 200 ms for company, even on an idle batcher.
    batcher = DynamicBatcher("encoder", run_batch, BatcherConfig(max_queue_delay_s=0.2, idle_dispatch=False))
    try:
        items = [batcher.submit((prompts, True), key=True, size=len(prompts)) for prompts in requests]
        for item in items:
            assert item.done.wait(60)
        assert batches == [3]  # one forward pass for the three requests
        for item, ref in zip(items, alone, strict=True):
            out = item.result
            assert out.truncated == ref.truncated
            assert torch.equal(out.text_mask, ref.text_mask)
            assert (out.text_embeds - ref.text_embeds).abs().max() <= 1e-5
            assert (out.text_encoder_hidden_states - ref.text_encoder_hidden_states).abs().max() <= 1e-5
        # deterministic: runs alone, bit-exact with encode_text
        det = batcher.run((requests[1], True), key=True, size=2, deterministic=True)
        assert torch.equal(det.text_embeds, alone[1].text_embeds)
        assert torch.equal(det.text_encoder_hidden_states, alone[1].text_encoder_hidden_states)
    finally:
        batcher.close()


def test_a_lone_request_on_an_idle_encoder_does_not_wait_for_company(engines):
    """The default (idle_dispatch): a request on an idle batcher starts at once, however long the window; the
    batcher's own counters say it never waited for company."""
    batcher = DynamicBatcher("encoder", lambda batch: list(batch), BatcherConfig(max_queue_delay_s=30.0))
    try:
        for i in range(3):  # one after another: each finds the worker idle
            assert batcher.run(i, key=0) == i
        assert batcher.stats.batches == 3
        assert batcher.stats.idle_dispatches == 3
        assert batcher.stats.delay_waits == 0 and batcher.stats.waited_s == 0.0
    finally:
        batcher.close()


def test_requests_arriving_while_a_batch_runs_form_the_next_batch(engines):
    """Idle dispatch keeps batching under load: the first request starts alone at once; the ones that queue
    while it runs share the next forward pass (same key), a deterministic one still runs alone."""
    gate = threading.Event()
    batches: list[list[str]] = []

    def run_batch(batch):
        batches.append(list(batch))
        if len(batches) == 1:
            gate.wait(30)  # the first batch runs until the others have queued
        return list(batch)

    batcher = DynamicBatcher("encoder", run_batch, BatcherConfig(max_queue_delay_s=30.0))
    try:
        first = batcher.submit("a", key=0)
        assert first.started.wait(10)
        later = [batcher.submit(p, key=0) for p in ("b", "c", "d")]
        det = batcher.submit("e", key=0, deterministic=True)
        gate.set()
        assert [item.wait() for item in [first, *later, det]] == ["a", "b", "c", "d", "e"]
        assert batches == [["a"], ["b", "c", "d"], ["e"]]
        assert batcher.stats.idle_dispatches == 1  # only the first found the worker idle
        assert batcher.stats.delay_waits == 0
    finally:
        batcher.close()


def test_each_request_is_charged_its_share_of_the_batch_time():
    """Usage: a batch's run time is split over its requests by their sizes, and reported as busy time once."""
    gate = threading.Event()
    busy: list[float] = []

    def run_batch(batch):
        if batch == ["a"]:
            gate.wait(30)  # the first batch runs until the others have queued
        else:
            time.sleep(0.2)
        return list(batch)

    batcher = DynamicBatcher("encoder", run_batch, BatcherConfig(max_queue_delay_s=30.0), on_busy=busy.append)
    try:
        first = batcher.submit("a", key=0)
        assert first.started.wait(10)
        small, large = batcher.submit("b", key=0, size=1), batcher.submit("c", key=0, size=3)
        gate.set()
        for item in (first, small, large):
            item.wait()
        assert len(busy) == 2 and busy[1] >= 0.2
        assert small.compute_seconds + large.compute_seconds == pytest.approx(busy[1])
        assert large.compute_seconds == pytest.approx(3 * small.compute_seconds)
        assert first.compute_seconds == pytest.approx(busy[0])
    finally:
        batcher.close()


def test_full_queue_is_refused(engines):
    gate = threading.Event()

    def slow(batch):
        gate.wait(30)
        return [None] * len(batch)

    batcher = DynamicBatcher("encoder", slow, BatcherConfig(max_queue_size=1, max_queue_delay_s=0.0))
    try:
        first = batcher.submit("a", key=0)
        assert first.started.wait(10)  # running, the queue is empty again
        batcher.submit("b", key=0)
        with pytest.raises(QueueFull):
            batcher.submit("c", key=0)
        gate.set()
    finally:
        batcher.close()


def test_deployment_deterministic_runs_every_request_alone(engines):
    batches: list[int] = []

    def run_batch(batch):
        batches.append(len(batch))
        return [engines.encoder.encode_text(p, True) for p in batch]

    # --deterministic / UNCLIP_DETERMINISTIC for the whole deployment
    config = BatcherConfig(max_queue_delay_s=0.2, deterministic=True)
    batcher = DynamicBatcher("encoder", run_batch, config)
    try:
        items = [batcher.submit(["a red circle"], key=True) for _ in range(3)]
        for item in items:
            item.wait()
        assert batches == [1, 1, 1]
    finally:
        batcher.close()


# --- the encoder service itself (a real process, real gRPC): its batcher is wired to EncodeText ---


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def encoder_service(tiny_model_dir, tmp_path_factory):
    """`python -m services.encoder` with a 300 ms batching window (Triton's: the oldest request waits for
    company even on an idle encoder, UNCLIP_IDLE_DISPATCH=false) and room for 3 waiting requests."""
    import os
    import sys
    import time

    from unclip.runtime.server import health_status
    from unclip.stack import Process

    metrics_port = _free_port()
    process = Process(
        name="encoder",
        argv=[sys.executable, "-m", "services.encoder", "--model", str(tiny_model_dir), "--host", "127.0.0.1",
              "--port", "0", "--metrics-port", str(metrics_port), "--max-queue-delay-ms", "300",
              "--max-queue-size", "3"],
        log_path=tmp_path_factory.mktemp("encoder-service") / "encoder.log",
    )  # fmt: skip
    env = {
        **os.environ,
        "UNCLIP_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "UNCLIP_IDLE_DISPATCH": "false",
    }
    process.start(env)
    try:
        deadline = time.monotonic() + 180
        while not (process.poll_address() and health_status(process.address, timeout=1.0) == "SERVING"):
            assert process.alive(), process.failure()
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.2)
        yield process.address, metrics_port
    finally:
        process.popen.terminate()
        process.popen.wait(timeout=60)


def _forward_passes(metrics_port: int) -> tuple[int, float, int]:
    """(forward passes, prompts in them, passes of exactly one prompt) from the encoder's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    count = total = single = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("service") != "encoder":
                continue
            if sample.name == "unclip_forward_pass_images_count":
                count = int(sample.value)
            elif sample.name == "unclip_forward_pass_images_sum":
                total = sample.value
            elif sample.name == "unclip_forward_pass_images_bucket" and sample.labels["le"] == "1.0":
                single = int(sample.value)
    return count, total, single


def _encode(address: str, requests, deterministic: bool):
    """The requests at once, each from its own thread; their decoded outputs, in order."""
    import concurrent.futures

    from unclip.runtime.server import create_channel
    from unclip.runtime.slots import DETERMINISTIC_KEY
    from unclip.runtime.tensors import from_proto
    from unclip.v1 import encoder_pb2, encoder_pb2_grpc

    metadata = ((DETERMINISTIC_KEY, "1"),) if deterministic else None
    with create_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        start = threading.Barrier(len(requests))

        def one(prompts):
            start.wait()
            request = encoder_pb2.EncodeTextRequest(prompts=prompts, do_classifier_free_guidance=True)
            reply = stub.EncodeText(request, timeout=60, metadata=metadata)
            return (
                from_proto(reply.text_embeds, "text_embeds"),
                from_proto(reply.text_encoder_hidden_states, "text_encoder_hidden_states"),
                from_proto(reply.text_mask, "text_mask"),
                list(reply.truncated),
            )

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))


def test_encoder_service_batches_concurrent_calls(engines, encoder_service):
    """Concurrent EncodeText calls share forward passes (the service's own forward-pass histogram shows
    passes of several prompts) and agree with the engine alone within float rounding; with the deterministic
    metadata every call runs alone and is bit-exact."""
    address, metrics_port = encoder_service
    requests = [["a red circle"], ["a blue square", "a green triangle"], ["x" * 300]]  # different lengths
    alone = [engines.encoder.encode_text(prompts, True) for prompts in requests]

    # A call alone through the service is exactly the engine's output (same weights, same kernels).
    ((embeds, hidden, _, _),) = _encode(address, requests[:1], deterministic=False)
    assert torch.equal(embeds, alone[0].text_embeds)
    assert torch.equal(hidden, alone[0].text_encoder_hidden_states)

    passes, prompts, single = _forward_passes(metrics_port)
    got = _encode(address, requests, deterministic=False)
    passes2, prompts2, single2 = _forward_passes(metrics_port)
    assert prompts2 - prompts == 4  # every prompt went through once ...
    assert passes2 - passes < len(requests)  # ... in fewer forward passes than requests
    assert passes2 - passes - (single2 - single) >= 1  # at least one pass held several prompts
    drift = 0.0
    for (embeds, hidden, mask, truncated), ref in zip(got, alone, strict=True):
        assert truncated == ref.truncated and torch.equal(mask, ref.text_mask)
        drift = max(drift, (embeds - ref.text_embeds).abs().max().item(),
                    (hidden - ref.text_encoder_hidden_states).abs().max().item())  # fmt: skip
    print(f"encoder batched-vs-alone drift: {drift:.2e}")
    assert drift <= 1e-5

    passes, prompts, single = _forward_passes(metrics_port)
    got = _encode(address, requests, deterministic=True)
    passes2, prompts2, single2 = _forward_passes(metrics_port)
    assert passes2 - passes == len(requests)  # one pass per request: nothing shared
    for (embeds, hidden, _, _), ref in zip(got, alone, strict=True):
        assert torch.equal(embeds, ref.text_embeds)
        assert torch.equal(hidden, ref.text_encoder_hidden_states)


def test_encoder_service_full_queue_is_refused_with_a_retry_hint(encoder_service):
    """A batch waiting for company (300 ms window) holds the worker; deterministic calls cannot join it and
    queue (room for 3); the next is refused at once with RESOURCE_EXHAUSTED and a retry hint."""
    import concurrent.futures
    import time

    import grpc

    from unclip.runtime.errors import retry_after
    from unclip.runtime.server import create_channel
    from unclip.runtime.slots import DETERMINISTIC_KEY
    from unclip.v1 import encoder_pb2, encoder_pb2_grpc

    address, _ = encoder_service
    request = encoder_pb2.EncodeTextRequest(prompts=["a red circle"], do_classifier_free_guidance=True)
    with create_channel(address) as channel, concurrent.futures.ThreadPoolExecutor(6) as pool:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        opener = pool.submit(stub.EncodeText, request, timeout=60)  # taken by the worker, waits 300 ms
        time.sleep(0.1)

        def deterministic_call():
            began = time.monotonic()
            try:
                stub.EncodeText(request, timeout=60, metadata=((DETERMINISTIC_KEY, "1"),))
                return "ok", time.monotonic() - began, None
            except grpc.RpcError as error:
                return error.code(), time.monotonic() - began, error

        outcomes = list(pool.map(lambda _: deterministic_call(), range(5)))
        opener.result()
    refused = [o for o in outcomes if o[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert [o[0] for o in outcomes].count("ok") >= 3, outcomes
    assert refused, outcomes
    assert all(o[1] < 0.25 and retry_after(o[2]) > 0 for o in refused), outcomes  # at once, with a hint


@pytest.mark.parametrize("prior_steps", [2, 7])
def test_encoder_batch_drift_through_the_cascade(engines, prior_steps):
    """Where the encoder's batching rounding (~1e-7) grows: the same request's conditioning, encoded alone and
    batched with two others, run through prior -> decoder -> super-res with the same generators; the drift
    after each stage is printed (BENCHMARKS.md records it) and the final pixels stay within the stack's bound
    (4/255, tests/reliability) for the prior steps the stack test uses (7)."""
    from unclip.rng import generators_from_seed

    requests = [["a red circle"], ["a blue square"], ["a green triangle, small"]]
    alone = engines.encoder.encode_text(requests[0], True)
    batched = engines.encoder.encode_text_batch(requests, True)[0]

    def cascade(cond):
        generators = generators_from_seed(11, 1)
        prior = engines.prior.sample(
            cond.text_embeds, cond.text_encoder_hidden_states, cond.text_mask, generators,
            num_inference_steps=prior_steps,
        )  # fmt: skip
        decoded = engines.decoder.decode(
            prior.image_embeds, cond.text_embeds, cond.text_encoder_hidden_states, cond.text_mask,
            prior.generators, num_inference_steps=12,
        )  # fmt: skip
        upsampled = engines.upsampler.upsample(decoded.images, decoded.generators, num_inference_steps=7)
        return {
            "encoder": torch.cat([cond.text_embeds.flatten(), cond.text_encoder_hidden_states.flatten()]),
            "prior": prior.image_embeds,
            "decoder": decoded.images,
            "super_res (pixels)": (upsampled.images + 1) / 2,  # [-1, 1] -> pixels in [0, 1]
        }

    a, b = cascade(alone), cascade(batched)
    drift = {stage: (a[stage] - b[stage]).abs().max().item() for stage in a}
    scale = {stage: a[stage].abs().max().item() for stage in a}
    print(f"\nencoder batching drift, prior {prior_steps} steps (max |diff|, max |value|):")
    for stage in drift:
        print(f"  {stage:<20} {drift[stage]:.2e}  {scale[stage]:.2e}")
    assert drift["encoder"] <= 1e-5
    if prior_steps == 7:
        assert drift["super_res (pixels)"] <= 4 / 255
