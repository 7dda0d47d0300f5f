"""The stack's ``ddim`` and ``dpmsolver++`` samplers equal a plain in-process loop written with diffusers'
own ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` (the configs ``unclip.sampling`` documents, built from
each stage's scheduler), on the same weights and generators, within 1e-4 (max abs, pixels in [0, 1]); per
batch makeup (n = 3) and n = 1, as the UnCLIPScheduler parity tests. The loop is UnCLIPPipeline's, with the
scheduler swapped and the decoder's learned variance dropped after guidance (the 6 -> 3 split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from unclip.runtime.tensors import from_proto
from unclip.sampling import ddim_config, dpmsolver_config
from unclip.v1 import orchestrator_pb2 as pb

TOLERANCE = 1e-4
STEPS = 3  # DPM-Solver++ 2M: first order, second order, first order to x0 (lower_order_final)
PROMPT = "a red circle on a blue square"
REFERENCE = {
    "ddim": (DDIMScheduler, ddim_config),
    "dpmsolver++": (DPMSolverMultistepScheduler, dpmsolver_config),
}


def scheduler_for(name: str, stage_scheduler, steps: int):
    cls, config = REFERENCE[name]
    scheduler = cls(**config(stage_scheduler.config))
    scheduler.set_timesteps(steps)
    return scheduler


@torch.inference_mode()  # as the stages run (UNCLIP_INFERENCE_MODE); no_grad can round attention differently
def reference_loop(
    stack_engines, name, n, seed, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, eta=0.0
):
    """UnCLIPPipeline.__call__ (text to 64 px) with diffusers' scheduler ``name`` at every stage."""
    encoder, prior, decoder, upsampler = stack_engines
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    step_kwargs = {"eta": eta, "generator": generators} if name == "ddim" else {}
    cfg = prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0

    # text (the encoder's parity with UnCLIPPipeline._encode_prompt is tested in tests/unit)
    text = encoder.encode_text([PROMPT] * n, cfg)
    prompt_embeds, hidden, mask = text.text_embeds, text.text_encoder_hidden_states, text.text_mask

    # prior
    scheduler = scheduler_for(name, prior.scheduler, STEPS)
    latents = randn_tensor((n, prior.embedding_dim), generator=generators, dtype=prompt_embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        predicted = prior.prior(
            model_input,
            timestep=t,
            proj_embedding=prompt_embeds,
            encoder_hidden_states=hidden,
            attention_mask=mask,
        ).predicted_image_embedding
        if cfg:
            uncond, cond = predicted.chunk(2)
            predicted = uncond + prior_guidance_scale * (cond - uncond)
        latents = scheduler.step(predicted, t, latents, **step_kwargs).prev_sample
    image_embeds = prior.prior.post_process_latents(latents)

    # decoder
    states, time_embeds = decoder.text_proj(
        image_embeddings=image_embeds,
        prompt_embeds=prompt_embeds,
        text_encoder_hidden_states=hidden,
        do_classifier_free_guidance=cfg,
    )
    decoder_mask = F.pad(mask, (decoder.text_proj.clip_extra_context_tokens, 0), value=True)
    scheduler = scheduler_for(name, decoder.scheduler, STEPS)
    size = decoder.decoder.config.sample_size
    latents = randn_tensor((n, 3, size, size), generator=generators, dtype=states.dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        noise_pred = decoder.decoder(
            sample=model_input,
            timestep=t,
            encoder_hidden_states=states,
            class_labels=time_embeds,
            attention_mask=decoder_mask,
        ).sample
        if cfg:
            uncond, cond = noise_pred.chunk(2)
            uncond, _ = uncond.split(3, dim=1)
            cond, _ = cond.split(3, dim=1)
            noise_pred = uncond + decoder_guidance_scale * (cond - uncond)
        else:
            noise_pred = noise_pred[:, :3]  # the learned variance: not used by this sampler
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    small = latents.clamp(-1, 1)

    # super-resolution
    scheduler = scheduler_for(name, upsampler.scheduler, STEPS)
    size = upsampler.first.config.sample_size
    upscaled = F.interpolate(small, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    latents = randn_tensor((n, 3, size, size), generator=generators, dtype=small.dtype)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        unet = upsampler.last if i == len(scheduler.timesteps) - 1 else upsampler.first
        noise_pred = unet(sample=torch.cat([latents, upscaled], dim=1), timestep=t).sample
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return (latents.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def generate(image_service, name, n, seed, **params) -> np.ndarray:
    response = image_service.Generate(
        pb.GenerateRequest(
            prompt=PROMPT,
            n=n,
            size=64,
            seed=seed,
            output_format=pb.OUTPUT_FORMAT_FLOAT32,
            params=pb.SamplingParams(
                prior_num_inference_steps=STEPS,
                decoder_num_inference_steps=STEPS,
                super_res_num_inference_steps=[STEPS],
                prior_sampler=name,
                decoder_sampler=name,
                super_res_sampler=name,
                **params,
            ),
        )
    )
    return np.stack([from_proto(image.pixels, "pixels").numpy() for image in response.images])


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize(
    ("n", "seed", "guidance"),
    [
        (3, 7, {}),  # the stack's default guidance (prior 4.0, decoder 8.0)
        (1, 8, {}),  # image 1 of the n = 3 request, alone
        (2, 5, {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 0.0}),  # no decoder guidance
    ],
)
def test_sampler_through_the_stack_equals_diffusers_scheduler_loop(
    image_service, stack_engines, name, n, seed, guidance
):
    got = generate(image_service, name, n, seed, **guidance)
    expected = reference_loop(stack_engines, name, n, seed, **guidance)
    assert got.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert n == 1 or np.abs(got[0] - got[1]).max() > 0.1  # not a vacuous match: seeds differ


def test_ddim_with_eta_draws_from_each_image_generator(image_service, stack_engines):
    n, seed = 2, 11
    got = generate(image_service, "ddim", n, seed, ddim_eta=0.5)
    expected = reference_loop(stack_engines, "ddim", n, seed, eta=0.5)
    assert np.abs(got - expected).max() <= TOLERANCE
    # eta adds noise: the pictures differ from eta 0's
    assert np.abs(got - generate(image_service, "ddim", n, seed)).max() > 1e-2


def test_samplers_are_listed_and_bad_ones_refused(image_service):
    import grpc

    capabilities = image_service.GetCapabilities(pb.CapabilitiesRequest())
    assert list(capabilities.samplers) == ["unclip", "ddim", "dpmsolver++"]
    assert capabilities.defaults.decoder_sampler == "unclip"
    with pytest.raises(grpc.RpcError) as error:
        image_service.Generate(
            pb.GenerateRequest(prompt=PROMPT, params=pb.SamplingParams(decoder_sampler="euler"))
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.decoder_sampler" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        image_service.Generate(pb.GenerateRequest(prompt=PROMPT, params=pb.SamplingParams(ddim_eta=2.0)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.ddim_eta" in error.value.details()
