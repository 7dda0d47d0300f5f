"""CLIP concepts through the real service: with the image embeddings the caller sends, and with the real
encoder service (tiny random CLIP) embedding prompts, concept texts and images. Withheld images: the others
pass."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from safety_helpers import images_tensor, prompt_request, wait_serving

from unclip.tiny import make_tiny_model
from unclip.v1 import encoder_pb2, encoder_pb2_grpc, safety_pb2

WITHHOLD, ALLOW, BLOCK = safety_pb2.ACTION_WITHHOLD, safety_pb2.ACTION_ALLOW, safety_pb2.ACTION_BLOCK


def test_withhold_some_of_four_images_by_their_embeddings(start_safety):
    concept = [1.0, 0, 0, 0, 0, 0, 0, 0]
    safety = start_safety(
        f"""\
        version: concepts-1
        categories:
          gore: {{threshold: 0.9, action: withhold}}
          weapons: {{action: flag}}
        filters:
          concepts:
            type: clip_concepts
            concepts:
              - {{name: blood, category: gore, embedding: {concept}}}   # the category's threshold, 0.9
              - {{name: knife, category: weapons, embedding: [0, 1, 0, 0, 0, 0, 0, 0], threshold: 0.5}}
        stages:
          decoder_output: [concepts]
          final_output: [concepts]
        """
    )
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(4, 8)).astype(np.float32) * 0.05
    embeds[:, 2] = 1.0  # unrelated to both concepts
    embeds[1] = [3.0, 0.1, 0, 0, 0, 0, 0, 0]  # cos ~ 0.999 with "blood"
    embeds[3] = [2.0, 0.3, 0.2, 0, 0, 0, 0, 0]  # cos ~ 0.98 with "blood"
    embeds[2] = [0, 1.0, 0.8, 0, 0, 0, 0, 0]  # cos ~ 0.78 with "knife": flagged only
    request = safety_pb2.CheckImagesRequest(
        images=images_tensor(np.zeros((4, 3, 8, 8), np.float32)),
        image_embeds=images_tensor(embeds),
        stage=safety_pb2.CHECK_STAGE_DECODER_OUTPUT,
        context=safety_pb2.RequestContext(request_id="n4"),
    )
    reply = safety.stub.CheckImages(request, timeout=10)
    assert [v.action for v in reply.verdicts] == [ALLOW, WITHHOLD, safety_pb2.ACTION_FLAG, WITHHOLD]
    assert [list(v.categories) for v in reply.verdicts] == [[], ["gore"], ["weapons"], ["gore"]]
    assert reply.action == WITHHOLD  # not BLOCK: the orchestrator returns images 0 and 2
    [record] = safety.records()
    scores = [s for s in record["filters"][0]["scores"] if s["index"] == 1 and s["detail"] == "concept:blood"]
    assert scores[0]["score"] == pytest.approx(3 / np.sqrt(9.01), abs=1e-5) and scores[0]["hit"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def png(image: np.ndarray) -> bytes:
    pixels = ((np.clip(image.transpose(1, 2, 0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prompts_concept_texts_and_images_embedded_by_the_encoder(tiny_model, start_safety, spawn_process):
    encoder = spawn_process(
        ["-m", "services.encoder", "--model", str(tiny_model), "--host", "127.0.0.1", "--port", "0"]
    )
    wait_serving(encoder)
    images = np.random.default_rng(1).uniform(-1, 1, size=(3, 3, 32, 32)).astype(np.float32)
    with grpc.insecure_channel(encoder.addr) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        reply = stub.EncodeImage(encoder_pb2.EncodeImageRequest(images=[png(i) for i in images]), timeout=60)
    image_embeds = np.frombuffer(reply.image_embeds.data, np.float32).reshape(list(reply.image_embeds.shape))
    pinned = [float(x) for x in image_embeds[0]]  # a concept pinned to image 0's own CLIP embedding

    safety = start_safety(
        f"""\
        version: concepts-2
        categories:
          gore: {{action: block}}
          sexual: {{action: withhold}}
        filters:
          concepts:
            type: clip_concepts
            concepts:
              - {{name: red, category: gore, text: "a red circle", threshold: 0.9999}}
              - {{name: pinned, category: sexual, embedding: {pinned}, threshold: 0.9999}}
        stages:
          prompt: [concepts]
          final_output: [concepts]
        """,
        extra=["--encoder-addr", encoder.addr],  # the policy names no encoder: the service's flag applies
    )
    # A prompt equal to the concept's text has cosine 1 with it; another prompt (random CLIP) does not reach
    # 0.9999.
    assert safety.stub.CheckPrompt(prompt_request("a red circle"), timeout=60).action == BLOCK
    assert safety.stub.CheckPrompt(prompt_request("a blue square"), timeout=60).action == ALLOW
    # Without image_embeds the filter has the encoder embed the images: image 0 matches its pinned concept.
    request = safety_pb2.CheckImagesRequest(
        images=images_tensor(images), stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT
    )
    reply = safety.stub.CheckImages(request, timeout=60)
    assert [v.action for v in reply.verdicts] == [WITHHOLD, ALLOW, ALLOW]


def test_unreachable_encoder_fails_closed(start_safety):
    safety = start_safety(
        """\
        encoder_addr: 127.0.0.1:1
        categories:
          gore: {action: block}
        filters:
          concepts: {type: clip_concepts, concepts: [{category: gore, text: gore, threshold: 0.3}]}
        stages:
          prompt: [concepts]
        """
    )
    reply = safety.stub.CheckPrompt(prompt_request("a calm sea"), timeout=30)
    assert reply.action == BLOCK and list(reply.verdicts[0].categories) == ["filter_unavailable"]
