"""A model folder's sampling_defaults.json becomes the orchestrator's default (unclip.stack);
a bad one, or a bad deployment value, is refused with the field named."""

import json
import subprocess
import sys

import pytest

from unclip.stack import sampling_defaults_env


def test_model_folder_defaults_become_orchestrator_environment(tmp_path):
    assert sampling_defaults_env(str(tmp_path)) == {}  # no file: the registry's default (Karlo's 4.0)
    (tmp_path / "sampling_defaults.json").write_text(json.dumps({"prior_guidance_scale": 2.0}))
    assert sampling_defaults_env(str(tmp_path)) == {"UNCLIP_PRIOR_GUIDANCE_SCALE": "2.0"}


def test_unknown_key_in_model_defaults_is_refused(tmp_path):
    (tmp_path / "sampling_defaults.json").write_text(json.dumps({"prior_guidance": 2.0}))
    with pytest.raises(ValueError, match="prior_guidance"):
        sampling_defaults_env(str(tmp_path))


@pytest.mark.parametrize(
    "flag", ["--prior-guidance-scale", "--decoder-guidance-scale", "--edit-decoder-guidance-scale"]
)
def test_orchestrator_refuses_a_negative_default_guidance_with_exit_2(flag):
    result = subprocess.run(
        [sys.executable, "-m", "services.orchestrator", "--port", "0", flag, "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert flag in result.stderr


def test_pipeline_params_use_the_deployment_default():
    from services.orchestrator.params import Params
    from unclip.v1 import orchestrator_pb2

    unset = orchestrator_pb2.SamplingParams()
    assert Params.from_proto(unset, 1, prior_guidance_scale=2.0).prior_guidance_scale == 2.0
    explicit = orchestrator_pb2.SamplingParams(prior_guidance_scale=5.0)
    assert Params.from_proto(explicit, 1, prior_guidance_scale=2.0).prior_guidance_scale == 5.0


def test_edit_guidance_default_reaches_the_orchestrator_and_edits_only(tmp_path):
    from services.orchestrator.params import Params
    from unclip.v1 import orchestrator_pb2

    (tmp_path / "sampling_defaults.json").write_text(json.dumps({"edit_decoder_guidance_scale": 4.0}))
    assert sampling_defaults_env(str(tmp_path)) == {"UNCLIP_EDIT_DECODER_GUIDANCE_SCALE": "4.0"}
    unset = orchestrator_pb2.SamplingParams()
    assert Params.from_proto(unset, 1, decoder_guidance_scale=4.0).decoder_guidance_scale == 4.0
    assert Params.from_proto(unset, 1).decoder_guidance_scale == 8.0  # Karlo's, what Generate uses
    explicit = orchestrator_pb2.SamplingParams(decoder_guidance_scale=6.0)
    assert Params.from_proto(explicit, 1, decoder_guidance_scale=4.0).decoder_guidance_scale == 6.0


def test_decoder_guidance_default_reaches_generations_and_variations(tmp_path):
    from services.orchestrator.params import Params
    from unclip.v1 import orchestrator_pb2

    (tmp_path / "sampling_defaults.json").write_text(
        json.dumps({"decoder_guidance_scale": 5.0, "edit_decoder_guidance_scale": 4.0})
    )
    assert sampling_defaults_env(str(tmp_path)) == {
        "UNCLIP_DECODER_GUIDANCE_SCALE": "5.0",
        "UNCLIP_EDIT_DECODER_GUIDANCE_SCALE": "4.0",
    }
    unset = orchestrator_pb2.SamplingParams()
    for prior in (True, False):  # generations; variations (no prior)
        params = Params.from_proto(unset, 1, prior=prior, decoder_guidance_scale=5.0)
        assert params.decoder_guidance_scale == 5.0
    explicit = orchestrator_pb2.SamplingParams(decoder_guidance_scale=6.0)
    assert Params.from_proto(explicit, 1, decoder_guidance_scale=5.0).decoder_guidance_scale == 6.0
