"""Request-level dynamic batching of the encoder with the real engine: concurrent requests share one forward
pass and get what they get alone (exactly for a request alone or deterministic, within rounding otherwise)."""

from __future__ import annotations

import threading

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

    batcher = DynamicBatcher("encoder", run_batch, BatcherConfig(max_queue_delay_s=0.2))
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
