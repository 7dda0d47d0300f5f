"""Interpolate through the real stack (tiny random model): frames in order, ends equal to the variations of
the end images (same seed, same decoder conditioning), reproducible, streamed, animated, and bad input
refused before anything is drawn."""

from __future__ import annotations

import io

import grpc
import numpy as np
import PIL.Image
import pytest

from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

FAST = pb.SamplingParams(
    prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
)


@pytest.fixture(scope="module")
def stub(stack):
    with stack.channel() as channel:
        yield orchestrator_pb2_grpc.ImageServiceStub(channel)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def two_images(stub) -> list[bytes]:
    response = stub.Generate(pb.GenerateRequest(prompt="a red circle", n=2, size=64, seed=5, params=FAST))
    return [image.png for image in response.images]


def test_frames_run_from_one_image_to_the_other(stub, two_images):
    request = pb.InterpolateRequest(
        start=pb.InterpolationEnd(image=two_images[0]),
        end=pb.InterpolationEnd(image=two_images[1]),
        frames=4,
        size=64,
        seed=11,
        params=FAST,
    )
    response = stub.Interpolate(request, timeout=300)
    frames = response.frames
    assert [image.index for image in frames.images] == [0, 1, 2, 3]
    assert list(response.thetas) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert frames.seed == 11 and all(image.seed == 11 for image in frames.images)
    assert all(pixels(image.png).shape == (64, 64, 3) for image in frames.images)

    # theta 0 and 1 decode the ends' own embeddings with the request's generator and the empty caption: they
    # are the images' variations with that seed (rows of a larger batch may round differently: 2/255).
    for end, frame in ((0, 0), (1, 3)):
        variation = stub.CreateVariation(
            pb.VariationRequest(image=two_images[end], n=1, size=64, seed=11, params=FAST), timeout=300
        )
        assert np.abs(pixels(frames.images[frame].png) - pixels(variation.images[0].png)).max() <= 2

    # A frame in between is neither end.
    first, last = pixels(frames.images[0].png), pixels(frames.images[3].png)
    middle = pixels(frames.images[1].png)
    assert np.abs(middle - first).mean() > 0 and np.abs(middle - last).mean() > 0

    again = stub.Interpolate(request, timeout=300)  # reproducible by seed
    for a, b in zip(frames.images, again.frames.images, strict=True):
        assert np.abs(pixels(a.png) - pixels(b.png)).max() <= 2


def test_prompt_ends_stream_progress_and_an_animation(stub):
    request = pb.InterpolateRequest(
        start=pb.InterpolationEnd(prompt="a red circle"),
        end=pb.InterpolationEnd(prompt="a blue square"),
        frames=3,
        size=32,
        seed=2,
        params=FAST,
        animation=pb.ANIMATION_FORMAT_GIF,
    )
    events = list(stub.InterpolateStream(request, timeout=300))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "interpolation"
    assert "step" in kinds and {"prior", "decoder"} <= {
        e.stage_started.stage for e in events if e.stage_started.stage
    }
    response = events[-1].interpolation
    assert len(response.frames.images) == 3 and response.animation_format == pb.ANIMATION_FORMAT_GIF
    animation = PIL.Image.open(io.BytesIO(response.animation))
    assert animation.format == "GIF" and animation.n_frames == 3 and animation.size == (32, 32)


def _not_an_image() -> bytes:
    return b"this is text, not a picture"


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _set(**fields):
    def apply(request: pb.InterpolateRequest) -> None:
        for name, value in fields.items():
            if isinstance(value, pb.InterpolationEnd):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)

    return apply


BAD = [  # (what changes in a valid request, the field the error names)
    (lambda request: request.ClearField("start"), "start"),
    (lambda request: request.ClearField("end"), "end"),
    (_set(frames=1), "frames"),
    (_set(frames=33), "frames"),
    (_set(start=pb.InterpolationEnd(image=_not_an_image())), "start.image"),
    (_set(start=pb.InterpolationEnd(image=_png(64)), end=pb.InterpolationEnd(image=_png(32))), "end.image"),
    (_set(noise=pb.INTERPOLATION_NOISE_INVERTED), "noise"),  # prompt ends have no latent to invert
    (_set(start=pb.InterpolationEnd(prompt="")), "start.prompt"),
    (_set(size=4096), "size"),
]


@pytest.mark.parametrize("change, field", BAD, ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD)])
def test_bad_input_is_refused_before_anything_runs(stub, change, field):
    request = pb.InterpolateRequest(
        start=pb.InterpolationEnd(prompt="a red circle"),
        end=pb.InterpolationEnd(prompt="a blue square"),
        frames=3,
        params=FAST,
    )
    change(request)
    events = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in stub.InterpolateStream(request, timeout=60):
            events.append(event)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(field), caught.value.details()
    assert events == []  # refused before "accepted": nothing was drawn


@pytest.mark.parametrize("which", ["start", "end"])
def test_a_refused_prompt_at_either_end_draws_nothing(stub, which):
    from services.safety.refusal import parse_refusal

    request = pb.InterpolateRequest(
        start=pb.InterpolationEnd(prompt="a red circle"),
        end=pb.InterpolationEnd(prompt="a blue square"),
        frames=3,
        params=FAST,
    )
    getattr(request, which).prompt = "a nazi flag"
    stages = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in stub.InterpolateStream(request, timeout=60):
            stages.append(event.stage_started.stage)
    refusal = parse_refusal(caught.value)
    assert refusal is not None and "hate" in refusal.categories, caught.value.details()
    assert not {"prior", "decoder"} & set(stages)  # refused before any model drew


# ---- inverted noise and text diffs (the decoder's DDIM inversion) ------------------------------------------


def test_inverted_interpolation_and_text_diff_are_reproducible(stub, two_images):
    inverted = pb.InterpolateRequest(
        start=pb.InterpolationEnd(image=two_images[0]),
        end=pb.InterpolationEnd(image=two_images[1]),
        frames=3,
        noise=pb.INTERPOLATION_NOISE_INVERTED,
        size=64,
        seed=4,
        params=FAST,
    )
    first = stub.Interpolate(inverted, timeout=300)
    assert [image.index for image in first.frames.images] == [0, 1, 2]
    again = stub.Interpolate(inverted, timeout=300)
    for a, b in zip(first.frames.images, again.frames.images, strict=True):
        assert np.abs(pixels(a.png) - pixels(b.png)).max() <= 2
    fixed = pb.InterpolateRequest()
    fixed.CopyFrom(inverted)
    fixed.noise = pb.INTERPOLATION_NOISE_FIXED
    other = stub.Interpolate(fixed, timeout=300)
    assert np.abs(pixels(other.frames.images[0].png) - pixels(first.frames.images[0].png)).mean() > 1

    diff = stub.TextDiff(
        pb.TextDiffRequest(
            image=two_images[0],
            from_caption="a red circle",
            to_caption="a blue circle",
            frames=3,
            size=64,
            seed=4,
            params=FAST,
            animation=pb.ANIMATION_FORMAT_WEBP,
        ),
        timeout=300,
    )
    assert list(diff.thetas) == pytest.approx([0, 0.25, 0.5])  # max_theta 0 means the paper's 0.5
    assert len(diff.frames.images) == 3 and diff.animation_format == pb.ANIMATION_FORMAT_WEBP
    assert PIL.Image.open(io.BytesIO(diff.animation)).n_frames == 3


def _diff_request(**fields) -> pb.TextDiffRequest:
    request = pb.TextDiffRequest(
        image=_png(64), from_caption="a red circle", to_caption="a blue circle", frames=2, params=FAST
    )
    for name, value in fields.items():
        if isinstance(value, pb.SamplingParams):
            getattr(request, name).MergeFrom(value)
        else:
            setattr(request, name, value)
    return request


BAD_DIFFS = [
    (dict(image=b""), "image"),
    (dict(image=_not_an_image()), "image"),
    (dict(from_caption=""), "from_caption"),
    (dict(to_caption="x" * 1001), "to_caption"),
    (dict(frames=40), "frames"),
    (dict(max_theta=1.5), "max_theta"),
    (dict(max_theta=-0.2), "max_theta"),
    (dict(params=pb.SamplingParams(decoder_sampler="unclip")), "params.decoder_sampler"),
    (dict(params=pb.SamplingParams(ddim_eta=0.5)), "params.ddim_eta"),
]


@pytest.mark.parametrize("fields, field", BAD_DIFFS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_DIFFS)])
def test_bad_text_diffs_name_the_field(stub, fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        stub.TextDiff(_diff_request(**fields), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(field), caught.value.details()


def test_a_refused_target_caption_is_refused(stub):
    from services.safety.refusal import parse_refusal

    with pytest.raises(grpc.RpcError) as caught:
        stub.TextDiff(_diff_request(to_caption="a swastika"), timeout=60)
    refusal = parse_refusal(caught.value)
    assert refusal is not None and "hate" in refusal.categories, caught.value.details()


def test_the_decoder_inverts_only_images_of_its_size(stack):
    import torch

    from unclip.runtime.tensors import to_proto
    from unclip.v1 import decoder_pb2, decoder_pb2_grpc

    with stack.channel("decoder") as channel:
        decoder = decoder_pb2_grpc.DecoderStub(channel)
        size = decoder.GetStageInfo(decoder_pb2.StageInfoRequest()).output_size
        with pytest.raises(grpc.RpcError) as caught:
            decoder.Invert(
                decoder_pb2.InvertRequest(images=to_proto(torch.zeros(1, 3, size * 2, size * 2))), timeout=60
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("images"), caught.value.details()
