"""Hostile input through the real services: every input the fuzzing review found gets its documented code
(INVALID_ARGUMENT naming the field, never INTERNAL), bombs and oversized requests are refused with the
receiving process's RSS growing < 100 MB, and afterwards every process still says SERVING."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import grpc
import PIL.Image
import pytest
import torch

from tests.helpers import (
    FAST,
    assert_every_process_serving,
    assert_invalid,
    code_of,
    image_bytes,
    stage_requests,
)
from unclip.fuzz.mutations import png_bomb
from unclip.rng import generators_from_seed
from unclip.runtime.tensors import encode_generators, to_proto
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    tensor_pb2,
)
from unclip.v1 import orchestrator_pb2 as pb

MB = 1024 * 1024
MASK = image_bytes(32, 32, "RGBA", alpha_hole=True)  # an edit's mask: its top-left quarter


# ---- helpers -----------------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextmanager
def rss_growth(pid: int):
    """Yields a list that holds, on exit, the largest RSS growth of `pid` seen while the block ran (sampled
    every 5 ms, so a transient peak counts)."""
    before, peak, done = rss(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth: list[int] = []
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth.append(max(peak[0], rss(pid)) - before)


def audit_bytes(stack) -> int:
    return sum(path.stat().st_size for path in (stack.log_dir / "audit").glob("*.jsonl"))


def stub(stack, name: str, kind):
    return kind(stack.channel(name))


@pytest.fixture(scope="module", autouse=True)
def still_serving_afterwards(stack):
    yield
    assert_every_process_serving(stack)


# ---- uploads: format, mode, header dimensions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt"), [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("P", "PNG"), ("LA", "PNG")]
)
def test_uploads_in_convertible_modes_are_converted(image_service, mode, fmt):
    data = image_bytes(32, 32, mode, fmt)
    assert PIL.Image.open(io.BytesIO(data)).mode == mode
    reply = image_service.CreateVariation(
        pb.VariationRequest(image=data, n=1, size=32, seed=1, params=FAST), timeout=120
    )
    assert len(reply.images) == 1


def test_edit_of_a_cmyk_tiff_is_converted(image_service):
    reply = image_service.Edit(
        pb.EditRequest(
            image=image_bytes(32, 32, "CMYK", "TIFF"),
            mask=MASK,
            prompt="a red circle",
            n=1,
            size=32,
            seed=1,
            params=FAST,
        ),
        timeout=120,
    )
    assert len(reply.images) == 1


@pytest.mark.parametrize("mode", ["F", "LAB", "I", "I;16"])
def test_uploads_in_other_modes_are_refused_naming_the_mode(stack, image_service, mode):
    data = image_bytes(32, 32, mode, "TIFF")
    assert PIL.Image.open(io.BytesIO(data)).mode == mode
    assert_invalid(image_service.CreateVariation, pb.VariationRequest(image=data, size=32), "image", mode)
    assert_invalid(
        image_service.Edit,
        pb.EditRequest(image=data, mask=MASK, prompt="x", size=32),
        "image",
        mode,
    )
    encoder = stub(stack, "encoder", encoder_pb2_grpc.EncoderStub)
    assert_invalid(encoder.EncodeImage, encoder_pb2.EncodeImageRequest(images=[data]), "images[0]", mode)


def test_a_decompression_bomb_is_refused_from_its_header(stack, image_service):
    bomb = png_bomb(4096)
    assert len(bomb) < 200
    encoder = stub(stack, "encoder", encoder_pb2_grpc.EncoderStub)
    with rss_growth(stack.pids["orchestrator"]) as orchestrator, rss_growth(stack.pids["encoder"]) as enc:
        assert_invalid(
            image_service.CreateVariation,
            pb.VariationRequest(image=bomb, n=10, size=32),
            "image",
            "4096x4096",
        )
        assert_invalid(
            encoder.EncodeImage, encoder_pb2.EncodeImageRequest(images=[bomb] * 10), "images[0]", "4096x4096"
        )
    assert orchestrator[0] < 100 * MB and enc[0] < 100 * MB, (orchestrator, enc)


def test_an_upload_over_the_byte_limit_is_refused(image_service):
    assert_invalid(
        image_service.CreateVariation, pb.VariationRequest(image=b"\x89PNG" + b"\0" * (5 * MB)), "request"
    )


# ---- stage tensors -----------------------------------------------------------------------------------------


def test_a_tensor_shape_that_overflows_int64_is_refused(stack):
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2**62 + 1, 4], data=b"\0" * 16)
    decoder = stub(stack, "decoder", decoder_pb2_grpc.DecoderStub)
    assert_invalid(decoder.Decode, decoder_pb2.DecodeRequest(image_embeds=huge), "image_embeds", "dimension")
    prior = stub(stack, "prior", prior_pb2_grpc.PriorStub)
    assert_invalid(prior.Sample, prior_pb2.PriorRequest(text_embeds=huge), "text_embeds", "dimension")
    deep = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1] * 9, data=b"\0" * 4)
    assert_invalid(decoder.Decode, decoder_pb2.DecodeRequest(image_embeds=deep), "image_embeds", "dimensions")


def _decode_request(stack, inpaint_side: int) -> decoder_pb2.DecodeRequest:
    """A valid n=1 decoder request (the encoder and prior make its inputs) with an inpaint of that side."""
    _, request = stage_requests(stack.channel, ["x"])
    request.inpaint.CopyFrom(
        decoder_pb2.InpaintInput(
            image=to_proto(torch.zeros(1, 3, inpaint_side, inpaint_side)),
            mask=to_proto(torch.ones(1, 1, inpaint_side, inpaint_side)),
        )
    )
    return request


def test_inpaint_images_are_checked_against_the_stage_size(stack):
    decoder = stub(stack, "decoder", decoder_pb2_grpc.DecoderStub)  # 32 px: inpaint up to 16 x 32 = 512
    assert_invalid(decoder.Decode, _decode_request(stack, 1024), "inpaint.image", "1024x1024")
    upsampler = stub(stack, "super_res", decoder_pb2_grpc.UpsamplerStub)  # 64 px: up to 1024
    side = 1100
    request = decoder_pb2.UpsampleRequest(
        images=to_proto(torch.zeros(1, 3, 32, 32)),
        generators=encode_generators(generators_from_seed(0, 1)),
        num_inference_steps=2,
        inpaint=decoder_pb2.InpaintInput(
            image=to_proto(torch.zeros(1, 3, side, side)), mask=to_proto(torch.ones(1, 1, side, side))
        ),
    )
    with rss_growth(stack.pids["super_res"]) as growth:
        assert_invalid(upsampler.Upsample, request, "inpaint.image", f"{side}x{side}")
    assert growth[0] < 100 * MB, growth


def test_safety_images_are_bounded(stack):
    from unclip.v1 import safety_pb2, safety_pb2_grpc

    safety = stub(stack, "safety", safety_pb2_grpc.SafetyStub)
    request = safety_pb2.CheckImagesRequest(
        images=to_proto(torch.zeros(1, 3, 1100, 1100)), stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT
    )
    assert_invalid(safety.CheckImages, request, "images", "1100x1100")
    long_user = safety_pb2.CheckPromptRequest(prompt="x", context=safety_pb2.RequestContext(user="u" * 257))
    assert_invalid(safety.CheckPrompt, long_user, "context.user")


# ---- bytes that do not parse, on every service -------------------------------------------------------------

GARBAGE = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # field 1, a length varint that overflows


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("orchestrator", "/unclip.v1.ImageService/Generate"),
        ("encoder", "/unclip.v1.Encoder/EncodeText"),
        ("prior", "/unclip.v1.Prior/Sample"),
        ("decoder", "/unclip.v1.Decoder/Decode"),
        ("super_res", "/unclip.v1.Upsampler/Upsample"),
        ("safety", "/unclip.v1.Safety/CheckPrompt"),
        ("safety", "/grpc.health.v1.Health/Check"),
    ],
)
def test_unparseable_requests_are_invalid_argument(stack, name, method):
    call = stack.channel(name).unary_unary(method)
    code, details = code_of(lambda: call(GARBAGE, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith("request: not a valid message"), details


def test_invalid_utf8_in_a_string_field_is_invalid_argument_with_one_log_line(stack):
    log = stack.log_dir / "orchestrator.log"
    before = log.read_text(errors="replace")
    call = stack.channel("orchestrator").unary_unary("/unclip.v1.ImageService/Generate")
    code, details = code_of(lambda: call(b"\x0a\x02\xff\xfe", timeout=30))  # prompt = two invalid UTF-8 bytes
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    time.sleep(0.2)
    added = log.read_text(errors="replace")[len(before) :]
    assert "Traceback" not in added and "Exception deserializing" not in added, added
    assert len([line for line in added.splitlines() if "not a valid message" in line]) == 1, added


def test_unparseable_reflection_and_stream_requests_are_invalid_argument(stack):
    reflection = stack.channel("prior").stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(reflection(iter([GARBAGE]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    stream = stack.channel("orchestrator").unary_stream("/unclip.v1.ImageService/GenerateStream")
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(GARBAGE, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value


# ---- bounded strings and message sizes ---------------------------------------------------------------------


def test_user_is_bounded(image_service):
    assert_invalid(image_service.Generate, pb.GenerateRequest(prompt="x", user="u" * 257), "user", "256")


def test_oversized_requests_are_refused_with_bounded_memory(stack, image_service):
    pid, audit_before = stack.pids["orchestrator"], audit_bytes(stack)
    with rss_growth(pid) as growth:
        # Over Generate's own limit (64 KiB), under the server's (an edit's two uploads): the guard refuses it
        # before parsing.
        request = pb.GenerateRequest(prompt="x", user="u" * (4 * MB))
        code, details = code_of(lambda: image_service.Generate(request, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request:"), (code, details)
        # Over the server's receive limit: refused by gRPC before it is buffered whole.
        request = pb.GenerateRequest(prompt="x", user="u" * (64 * MB))
        code, details = code_of(lambda: image_service.Generate(request, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert growth[0] < 100 * MB, growth
    assert audit_bytes(stack) - audit_before < 64 * 1024  # nothing reached the safety service's audit log


# ---- text outputs, streams ---------------------------------------------------------------------------------


def test_control_characters_are_escaped_in_the_audit_output(stack, image_service):
    user = "mallory\n2026-01-01T00:00:00.000Z  block    prompt  request=forged\x1b[2K\u202e"
    reply = image_service.Generate(
        pb.GenerateRequest(prompt="a red circle", n=1, size=32, seed=3, params=FAST, user=user), timeout=120
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip",
            "audit",
            "--dir",
            str(stack.log_dir / "audit"),
            "--request-id",
            reply.request_id,
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(f"request={reply.request_id}" in line for line in lines), out.stdout
    assert "mallory\\n2026" in lines[0] and "\\x1b[2K\\u202e" in lines[0], lines[0]
    assert "\x1b" not in out.stdout and "\u202e" not in out.stdout


def test_generate_stream_validates_before_accepting(image_service):
    events = image_service.GenerateStream(pb.GenerateRequest(prompt="", size=32), timeout=30)
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in events:
            received.append(event)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("prompt")
    assert received == []


# ---- what a service exposes: metrics address, reflection ------------------------------------------------


def _listening(port: int) -> list[str]:
    """Local addresses ("7F000001", "00000000") of TCP sockets listening on `port` (from /proc/net/tcp)."""
    found = []
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_metrics_bind_where_the_service_binds_and_reflection_can_be_off(stack, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "services.orchestrator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--reflection",
        "false",
        "--stage-health-period-seconds",
        "0",
    ]
    for flag in ("--encoder-addr", "--prior-addr", "--decoder-addr", "--upsampler-addrs", "--safety-addr"):
        argv += [flag, "127.0.0.1:9"]  # nothing there: it stays NOT_SERVING, which is enough here
    log = tmp_path / "orchestrator.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=stack.env)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        address = log.read_text().split("listening on ")[1].split()[0]
        assert _listening(metrics_port) == ["0100007F"], _listening(metrics_port)  # 127.0.0.1 only
        channel = grpc.insecure_channel(address)  # a process of this test's own, not the shared stack
        reflection = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection(iter([b"\x3a\x00"]), timeout=10))  # list_services
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    # The shared stack keeps the default: reflection on.
    reflection = stack.channel("prior").stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    answers = list(reflection(iter([b"\x3a\x00"]), timeout=10))
    assert answers and b"unclip.v1.Prior" in answers[0]
