"""The orchestrator's sampling parameters: samplers and their defaults, checked with the field's name."""

from __future__ import annotations

import pytest

from services.orchestrator.params import Params, StepDefaults
from unclip.limits import LIMITS, default
from unclip.v1 import orchestrator_pb2 as pb


def test_unset_samplers_and_steps_take_the_deployment_defaults():
    defaults = StepDefaults(
        prior_num_inference_steps=10, decoder_sampler="dpmsolver++", super_res_num_inference_steps=4
    )
    params = Params.from_proto(pb.SamplingParams(prior_sampler="ddim"), 2, defaults=defaults)
    assert (params.prior_sampler, params.decoder_sampler, params.super_res_sampler) == (
        "ddim",
        "dpmsolver++",
        "unclip",
    )
    assert params.prior_num_inference_steps == 10 and params.super_res_num_inference_steps == [4, 4]
    assert params.decoder_num_inference_steps == default("decoder_num_inference_steps")


def test_edits_run_unclip_and_refuse_another_sampler():
    defaults = StepDefaults(decoder_sampler="ddim", super_res_sampler="ddim", prior_sampler="ddim")
    params = Params.from_proto(pb.SamplingParams(), 1, defaults=defaults, edit=True)
    assert (params.prior_sampler, params.decoder_sampler, params.super_res_sampler) == (
        "ddim",
        "unclip",
        "unclip",
    )
    with pytest.raises(ValueError, match="^params.super_res_sampler must be 'unclip' for edits"):
        Params.from_proto(pb.SamplingParams(super_res_sampler="dpmsolver++"), 1, edit=True)


def test_edits_take_the_library_steps_where_the_deployment_default_sampler_is_another():
    """Steps chosen for DPM-Solver++ (10 / 2) are too few for UnCLIP's sampler, which edits run."""
    defaults = StepDefaults(
        prior_num_inference_steps=10,
        decoder_num_inference_steps=10,
        super_res_num_inference_steps=2,
        prior_sampler="dpmsolver++",
        decoder_sampler="dpmsolver++",
        super_res_sampler="dpmsolver++",
    )
    params = Params.from_proto(pb.SamplingParams(), 1, defaults=defaults, edit=True)
    assert (params.prior_sampler, params.prior_num_inference_steps) == ("dpmsolver++", 10)
    assert params.decoder_num_inference_steps == default("decoder_num_inference_steps")
    assert params.super_res_num_inference_steps == [default("super_res_num_inference_steps")]
    asked = pb.SamplingParams(decoder_num_inference_steps=12, super_res_num_inference_steps=[3])
    params = Params.from_proto(asked, 1, defaults=defaults, edit=True)  # what a request asks for stands
    assert (params.decoder_num_inference_steps, params.super_res_num_inference_steps) == (12, [3])
    generate = Params.from_proto(pb.SamplingParams(), 1, defaults=defaults)
    assert (generate.decoder_num_inference_steps, generate.super_res_num_inference_steps) == (10, [2])
    unclip_defaults = StepDefaults(decoder_num_inference_steps=12, super_res_num_inference_steps=4)
    params = Params.from_proto(pb.SamplingParams(), 1, defaults=unclip_defaults, edit=True)
    assert (params.decoder_num_inference_steps, params.super_res_num_inference_steps) == (12, [4])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"decoder_sampler": "euler"},
            "^params.decoder_sampler must be one of unclip, ddim, dpmsolver\\+\\+",
        ),
        ({"ddim_eta": 1.5}, "^params.ddim_eta must be a number in 0..1"),
        ({"prior_num_candidates": LIMITS["prior_candidates"].high + 1}, "^params.prior_num_candidates"),
        ({"decoder_num_inference_steps": 1}, "^params.decoder_num_inference_steps must be in 2..1000"),
    ],
)
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Params.from_proto(pb.SamplingParams(**fields), 1)


def test_deployment_defaults_are_checked_with_the_flag_name():
    with pytest.raises(ValueError, match="^--decoder-sampler must be one of"):
        StepDefaults(decoder_sampler="heun").check()
    with pytest.raises(ValueError, match="^--super-res-steps must be in"):
        StepDefaults(super_res_num_inference_steps=1).check()
