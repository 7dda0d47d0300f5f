"""Provenance on the images the shared stack returns: PNG metadata, a C2PA manifest that c2pa's own reader
validates against the stack's (test) CA, the invisible watermark, and `unclip verify` / the Verify RPC on
intact, altered and foreign files."""

from __future__ import annotations

import io
import json

import c2pa
import PIL.Image
import pytest

from unclip.v1 import orchestrator_pb2 as pb

PROMPT = "a small red circle on a blue background"
STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2])


@pytest.fixture(scope="module")
def client(stack):
    from unclip.v1 import orchestrator_pb2_grpc

    with stack.channel() as channel:
        yield orchestrator_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="module")
def generated(client):
    """One 128 px image (watermarked: 128 is the smallest marked size) and one 64 px image (not marked)."""
    big = client.Generate(
        pb.GenerateRequest(prompt=PROMPT, n=1, size=128, seed=11, params=pb.SamplingParams(**STEPS))
    )
    small = client.Generate(
        pb.GenerateRequest(prompt=PROMPT, n=1, size=64, seed=12, params=pb.SamplingParams(**STEPS))
    )
    return big, small


def test_png_carries_metadata_and_a_valid_c2pa_manifest(stack, generated):
    big, _ = generated
    png = big.images[0].png
    text = PIL.Image.open(io.BytesIO(png)).text
    assert text["unclip:request_id"] == big.request_id
    assert text["unclip:seed"] == "11" and text["unclip:index"] == "0" and text["unclip:size"] == "128"
    assert text["unclip:model"] == stack.model_dir.name and len(text["unclip:model_sha256"]) == 64
    assert text["Software"].startswith("unclip ")
    assert "unclip:prompt" not in text  # prompts are written only when the deployment turns it on
    parameters = json.loads(text["unclip:parameters"])
    assert parameters["operation"] == "generate" and parameters["watermark"] is True
    assert parameters["stages"]["prior"]["steps"] == 2 and parameters["stages"]["super_res_2"]["steps"] == 2
    assert "prompt" not in parameters

    # c2pa's own reader, trusting the stack's test CA: signature, chain and hash binding all valid.
    anchors = (stack.log_dir / "provenance" / "c2pa-test-ca.pem").read_text()
    settings = c2pa.Settings.from_dict(
        {"verify": {"verify_trust": True}, "trust": {"trust_anchors": anchors}}
    )
    with (
        c2pa.Context(settings=settings) as context,
        c2pa.Reader("image/png", io.BytesIO(png), context=context) as r,
    ):
        assert r.get_validation_state() == "Trusted", r.get_validation_results()
        manifest = r.get_active_manifest()
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"][
        "actions"
    ]
    assert actions[0]["action"] == "c2pa.created"
    assert actions[0]["digitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert manifest["claim_generator_info"][0]["name"] == "unclip"
    assert not any(a["label"].startswith("c2pa.thumbnail") for a in manifest["assertions"])
