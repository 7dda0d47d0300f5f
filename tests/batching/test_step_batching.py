"""Step-level batching with the real engines on a tiny model.

- Requests that share forward passes (joining a running batch at different steps, with different step
  counts, guidance scales and image counts) give the images they give alone, within a measured drift: every
  image keeps its own generator, so only float rounding of the batched kernels differs. Generator states
  match exactly.
- Deterministic requests (per request or per deployment) are bit-exact with the engine (tests/unit ties the
  engine to diffusers' reference within 1e-4).
- A cancelled request or one past its deadline leaves the batch within one step (the task's own step counter)
  and the others finish; a full queue raises QueueFull with a retry hint.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from unclip.batching.batcher import BatcherConfig, Cancelled, QueueFull, StepBatcher
from unclip.batching.stages import stage_for
from unclip.rng import generators_from_seed

# Largest difference (values in [-1, 1]) between an image batched with other requests and the same image
# alone. Kernels round differently by batch size (~3e-6 on a UNet output here), and the sampler amplifies it:
# the first step predicts x0 = (x - sqrt(1 - a) eps) / sqrt(a) at t = 999 where a = alphas_cumprod[999] =
# 2.4e-9, i.e. eps's rounding times ~2e4 before clipping, and guidance multiplies it again. The fewer steps
# follow, the more of it reaches the output. Measured on this tiny random model (torch 2.13 CPU, one thread):
# decoder (guidance 8, 10-12 steps) 7.5e-5 .. 1.5e-4; super-res 7 steps 1.4e-3, 5 steps ~3e-3, 2 steps 1.9e-2.
# Kernels differ by CPU: on an AVX-512 Xeon without bfloat16, the decoder request of 8 steps at guidance 5
# drifts 3.2e-3 batched, and alone it moves 4.1e-3 when its text states are scaled by (1 + 1e-7), one float32
# rounding step: that request is that sensitive to rounding. The same request with another's generator or
# another prompt's text states differs by 2.0, so 1e-2 (about one 8-bit level) still separates them.
BATCH_DRIFT = 1e-2  # decoder and prior
UPSAMPLER_DRIFT = 1e-2  # super-res with 5..7 steps (2 steps can reach 2e-2: not used here)


def text(engines, n: int, prompt: str = "a red circle", cfg: bool = True):
    return engines.encoder.encode_text([prompt] * n, cfg)


def decode_kwargs(
    engines, n: int, seed: int, steps: int, guidance: float = 8.0, prompt: str = "a red circle"
):
    cond = text(engines, n, prompt)
    torch.manual_seed(seed)
    embeds = torch.randn(n, engines.decoder.image_embed_dim)
    return dict(
        image_embeds=embeds,
        text_embeds=cond.text_embeds,
        text_encoder_hidden_states=cond.text_encoder_hidden_states,
        text_mask=cond.text_mask,
        generators=generators_from_seed(seed, n),
        num_inference_steps=steps,
        guidance_scale=guidance,
    )


def fresh(kwargs):
    """The same request with fresh generators (the engine advances them)."""
    out = dict(kwargs)
    out["generators"] = [torch.Generator().set_state(g.get_state()) for g in kwargs["generators"]]
    return out


class Recorder:
    """Counts forward passes and their sizes (the batcher's on_batch hook)."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, rows: int) -> None:
        self.sizes.append(rows)


def submit_staggered(batcher, stage, requests, gap_steps, **submit):
    """Submits requests one after another, each once the previous one has done `gap_steps` steps, so later
    ones join a running batch."""
    tickets = []
    for kwargs in requests:
        if tickets:
            first = tickets[-1]
            while first.task.steps_done < gap_steps and not first.done():
                time.sleep(0.001)
        tickets.append(batcher.submit(stage.start(**fresh(kwargs)), **submit))
    return tickets


def test_decoder_requests_joining_a_running_batch_match_alone(engines):
    stage = stage_for(engines.decoder)
    requests = [
        decode_kwargs(engines, 1, seed=1, steps=12),
        decode_kwargs(engines, 2, seed=2, steps=8, guidance=5.0, prompt="a blue square"),
        decode_kwargs(engines, 1, seed=3, steps=5),
        decode_kwargs(engines, 3, seed=4, steps=3, guidance=1.5),
    ]
    alone = [engines.decoder.decode(**fresh(kwargs)) for kwargs in requests]
    recorder = Recorder()
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=8, max_queue_delay_s=0.0), on_batch=recorder)
    try:
        tickets = submit_staggered(batcher, stage, requests, gap_steps=2)
        outputs = [ticket.result(timeout=120) for ticket in tickets]
    finally:
        batcher.close()

    # They really shared forward passes, and later requests joined while earlier ones were mid-way.
    assert max(recorder.sizes) > 1, recorder.sizes
    assert tickets[1].started_at < tickets[0].finished_at
    drift = max((out.images - ref.images).abs().max().item() for out, ref in zip(outputs, alone, strict=True))
    print(f"decoder batch drift: {drift:.2e}")
    assert drift <= BATCH_DRIFT
    for out, ref in zip(outputs, alone, strict=True):
        for g_out, g_ref in zip(out.generators, ref.generators, strict=True):
            assert torch.equal(g_out.get_state(), g_ref.get_state())  # same draws, same order


def test_prior_and_upsampler_batches_match_alone(engines):
    # prior: two requests, one reranking with 3 candidates
    prior_requests = []
    for seed, (n, k, steps) in enumerate([(2, 1, 6), (1, 3, 4), (1, 1, 3)]):
        cond = text(engines, n, f"prompt {seed}")
        prior_requests.append(
            dict(
                text_embeds=cond.text_embeds,
                text_encoder_hidden_states=cond.text_encoder_hidden_states,
                text_mask=cond.text_mask,
                generators=generators_from_seed(10 + seed, n),
                num_inference_steps=steps,
                num_candidates=k,
            )
        )
    # upsampler: tasks reach their last step (the `last` UNet) while others still use `first`
    torch.manual_seed(0)
    size = engines.upsampler.input_size
    up_requests = [
        dict(
            images=torch.rand(n, 3, size, size) * 2 - 1,
            generators=generators_from_seed(20 + n, n),
            num_inference_steps=s,
        )
        for n, s in [(1, 7), (2, 5), (1, 6)]
    ]
    for engine, method, requests in [
        (engines.prior, engines.prior.sample, prior_requests),
        (engines.upsampler, engines.upsampler.upsample, up_requests),
    ]:
        stage = stage_for(engine)
        alone = [method(**fresh(kwargs)) for kwargs in requests]
        recorder = Recorder()
        batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0), on_batch=recorder)
        try:
            tickets = submit_staggered(batcher, stage, requests, gap_steps=1)
            outputs = [ticket.result(timeout=120) for ticket in tickets]
        finally:
            batcher.close()
        assert max(recorder.sizes) > 1, (stage.name, recorder.sizes)
        for out, ref in zip(outputs, alone, strict=True):
            got = out.image_embeds if stage.name == "prior" else out.images
            want = ref.image_embeds if stage.name == "prior" else ref.images
            drift = (got - want).abs().max().item()
            print(f"{stage.name} batch drift: {drift:.2e}")
            assert drift <= (BATCH_DRIFT if stage.name == "prior" else UPSAMPLER_DRIFT), stage.name
            for g_out, g_ref in zip(out.generators, ref.generators, strict=True):
                assert torch.equal(g_out.get_state(), g_ref.get_state())


@pytest.mark.parametrize("per_deployment", [False, True])
def test_deterministic_requests_are_bit_exact_with_the_engine(engines, per_deployment):
    stage = stage_for(engines.decoder)
    requests = [decode_kwargs(engines, n, seed=30 + n, steps=4) for n in (1, 3, 2)]
    alone = [engines.decoder.decode(**fresh(kwargs)) for kwargs in requests]
    recorder = Recorder()
    config = BatcherConfig(max_queue_delay_s=0.05, deterministic=per_deployment)
    batcher = StepBatcher(stage, config, on_batch=recorder)
    try:
        tickets = [
            batcher.submit(stage.start(**fresh(kwargs)), deterministic=not per_deployment)
            for kwargs in requests
        ]
        outputs = [ticket.result(timeout=120) for ticket in tickets]
    finally:
        batcher.close()
    assert sorted(set(recorder.sizes)) == [1, 2, 3]  # each forward pass held one request's rows only
    for out, ref in zip(outputs, alone, strict=True):
        assert torch.equal(out.images, ref.images)


def test_cancelled_request_leaves_within_one_step_and_others_finish(engines):
    stage = stage_for(engines.decoder)
    keep = decode_kwargs(engines, 1, seed=40, steps=10)
    expected = engines.decoder.decode(**fresh(keep))
    batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0))
    try:
        doomed = batcher.submit(stage.start(**fresh(decode_kwargs(engines, 2, seed=41, steps=200))))
        kept = batcher.submit(stage.start(**fresh(keep)))
        while doomed.task.steps_done < 3:
            time.sleep(0.001)
        at_cancel = doomed.task.steps_done
        doomed.cancel()
        with pytest.raises(Cancelled) as stopped:
            doomed.result(timeout=60)
        # The stage's own step counter: at most one more step ran after cancel() returned.
        assert doomed.task.steps_done <= at_cancel + 1
        assert stopped.value.steps_done == doomed.task.steps_done and not stopped.value.deadline
        drift = (kept.result(timeout=60).images - expected.images).abs().max().item()
        print(f"decoder drift beside a cancelled request: {drift:.2e}")
        assert drift <= BATCH_DRIFT
        assert batcher.stats() == (0, 0)  # its slot is free
    finally:
        batcher.close()


def test_caller_gone_and_deadline_stop_the_work(engines):
    stage = stage_for(engines.decoder)
    batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0))
    try:
        gone = threading.Event()
        seen = []
        ticket = batcher.submit(
            stage.start(**decode_kwargs(engines, 1, seed=50, steps=200)),
            is_cancelled=gone.is_set,  # how a servicer passes "the RPC is no longer active"
            on_step=lambda step, total: seen.append(step),
        )
        while len(seen) < 2:
            time.sleep(0.001)
        gone.set()
        at = len(seen)
        with pytest.raises(Cancelled):
            ticket.result(timeout=60)
        assert ticket.task.steps_done <= at + 1

        expired = batcher.submit(
            stage.start(**decode_kwargs(engines, 1, seed=51, steps=500)), deadline=time.monotonic() + 0.3
        )
        with pytest.raises(Cancelled) as stopped:
            expired.result(timeout=60)
        assert stopped.value.deadline and 0 < expired.task.steps_done < 500
    finally:
        batcher.close()


def test_full_queue_refuses_at_once_with_a_retry_hint(engines):
    stage = stage_for(engines.decoder)
    # One running request fills the batch; two may wait; the fourth is refused.
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=1, max_queue_size=2, max_queue_delay_s=0.0))
    try:
        running = batcher.submit(stage.start(**decode_kwargs(engines, 1, seed=60, steps=300)))
        while running.task.steps_done < 1:
            time.sleep(0.001)
        waiting = [
            batcher.submit(stage.start(**decode_kwargs(engines, 1, seed=61 + i, steps=2))) for i in range(2)
        ]
        assert [t.queue_position for t in waiting] == [0, 1]
        began = time.monotonic()
        with pytest.raises(QueueFull) as refused:
            batcher.call(lambda: stage.start(**decode_kwargs(engines, 1, seed=70, steps=2)))
        assert time.monotonic() - began < 0.5  # refused at once, not after waiting
        assert refused.value.retry_after_s > 0 and "decoder" in str(refused.value)
        running.cancel()
        for ticket in waiting:
            ticket.result(timeout=60)
        # Slots freed: a new request is accepted and completes.
        assert (
            batcher.call(lambda: stage.start(**decode_kwargs(engines, 1, seed=71, steps=2))).images.shape[0]
            == 1
        )
    finally:
        batcher.close()


def test_bad_input_is_raised_before_queueing(engines):
    stage = stage_for(engines.decoder)
    kwargs = decode_kwargs(engines, 1, seed=80, steps=1)
    with pytest.raises(ValueError, match="^num_inference_steps"):
        stage.start(**kwargs)


def test_each_engine_is_its_own_stage(engines):
    """One denoising loop per stage: the batcher steps the engine itself (start/key/step/finish), the loop the
    engine's own call runs; anything else is refused."""
    for engine, name in [
        (engines.prior, "prior"),
        (engines.decoder, "decoder"),
        (engines.upsampler, "super_res"),
    ]:
        assert stage_for(engine) is engine and engine.name == name
    with pytest.raises(ValueError, match="^engine must be"):
        stage_for(engines.encoder)
