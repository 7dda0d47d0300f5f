"""OUTPUT_FORMAT_URL through the real path: a multi-process stack whose orchestrator stores the final PNGs in
a real S3 server (SeaweedFS, credentials enforced) and answers presigned GET URLs signed for the public
endpoint. The downloaded bytes are the PNG that OUTPUT_FORMAT_PNG returns for the same seed; a tampered
signature is refused by S3; an orchestrator without a bucket refuses URL requests naming output_format; one
whose S3 refuses its credentials answers UNAVAILABLE; one with a bucket but no S3 endpoint does not start."""

from __future__ import annotations

import io
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import numpy as np
import PIL.Image
import pytest
from s3server import ACCESS_KEY, SECRET_KEY  # noqa: I001 (tests/storage/conftest.py puts it on the path)

from unclip.runtime.server import create_channel, health_status
from unclip.stack import Process, Stack
from unclip.storage import ensure_bucket
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

BUCKET = "unclip-images"
STEPS = 2
PARAMS = pb.SamplingParams(
    prior_num_inference_steps=STEPS, decoder_num_inference_steps=STEPS, super_res_num_inference_steps=[STEPS]
)


def s3_env(s3, images_url: str) -> dict[str, str]:
    port = s3.endpoint.rsplit(":", 1)[1]
    return {
        "UNCLIP_S3_ENDPOINT": s3.endpoint,  # 127.0.0.1:port, what the orchestrator talks to
        "UNCLIP_S3_PUBLIC_ENDPOINT": f"localhost:{port}",  # what clients reach: the URLs are signed for it
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "UNCLIP_IMAGES_URL": images_url,
    }


@pytest.fixture(scope="module")
def stack(s3, tmp_path_factory):
    from unclip.tiny import make_tiny_model

    ensure_bucket(s3.client(), BUCKET)
    model = make_tiny_model(tmp_path_factory.mktemp("url-model") / "model", variation=False)
    running = Stack(
        model=str(model),
        port=0,
        log_dir=tmp_path_factory.mktemp("url-stack-logs"),
        grace_seconds=5.0,
        extra_env=s3_env(s3, f"s3://{BUCKET}/outputs"),
        # Extra orchestrators (start_orchestrator) join these stages and are called like the stack's own:
        # access control is tested in tests/access, not here.
        auth=False,
        tls=False,
    )
    running.start(timeout=300)
    try:
        yield running
    finally:
        running.stop()


def start_orchestrator(stack: Stack, env: dict[str, str], log: Path) -> Process:
    """Another orchestrator on the same stages, with its own environment."""
    addr = {p.name: p.address for p in stack.processes}
    argv = [
        sys.executable, "-m", "services.orchestrator", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--encoder-addr", addr["encoder"], "--prior-addr", addr["prior"],
        "--decoder-addr", addr["decoder"], "--upsampler-addrs", addr["super_res"],
        "--safety-addr", addr["safety"],
    ]  # fmt: skip
    process = Process(name="orchestrator-extra", argv=argv, log_path=log)
    process.start(env)
    return process


@pytest.fixture
def extra_orchestrator(stack, tmp_path):
    """Starts orchestrators with a given environment; waits until SERVING; stops them after the test."""
    started: list[Process] = []

    def start(overrides: dict[str, str | None], wait: bool = True) -> Process:
        env = {**stack._env()}
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        process = start_orchestrator(stack, env, tmp_path / f"orchestrator-{len(started)}.log")
        started.append(process)
        deadline = time.monotonic() + 120
        while wait:
            assert process.alive(), process.failure()
            address = process.poll_address()
            if address and health_status(address, timeout=1.0) == "SERVING":
                break
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        return process

    yield start
    for process in started:
        if process.alive():
            process.popen.terminate()
            process.popen.wait(timeout=30)


def generate(address: str, output_format: int, seed: int = 7, n: int = 2) -> pb.ImagesResponse:
    with create_channel(address) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        request = pb.GenerateRequest(
            prompt="a red circle",
            n=n,
            seed=seed,
            params=PARAMS,
            output_format=output_format,
            deterministic=True,
        )
        return stub.Generate(request, timeout=300)


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_url_images_are_the_png_images(stack, s3):
    by_url = generate(stack.address, pb.OUTPUT_FORMAT_URL)
    by_png = generate(stack.address, pb.OUTPUT_FORMAT_PNG)

    assert [i.index for i in by_url.images] == [0, 1]
    port = s3.endpoint.rsplit(":", 1)[1]
    for url_image, png_image in zip(by_url.images, by_png.images, strict=True):
        assert url_image.png == b""  # the bytes travel through S3, not the response
        parts = urlsplit(url_image.url)
        assert parts.netloc == f"localhost:{port}"  # signed for the public endpoint
        assert parts.path.startswith(f"/{BUCKET}/outputs/")
        assert by_url.request_id in parts.path
        assert parse_qs(parts.query)["X-Amz-Expires"] == ["3600"]  # 60 minutes
        data = download(url_image.url)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        # Same seed, deterministic: the very same pixels; each file's provenance names its own request.
        stored, inline = PIL.Image.open(io.BytesIO(data)), PIL.Image.open(io.BytesIO(png_image.png))
        assert np.array_equal(np.asarray(stored), np.asarray(inline))
        assert stored.text["unclip:request_id"] == by_url.request_id
        assert inline.text["unclip:request_id"] == by_png.request_id


def test_tampered_signature_is_refused(stack):
    url = generate(stack.address, pb.OUTPUT_FORMAT_URL, n=1).images[0].url
    download(url)  # the genuine URL works
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged = "0" if signature[-1] != "0" else "1"
    tampered = url.replace(f"X-Amz-Signature={signature}", f"X-Amz-Signature={signature[:-1]}{forged}")
    assert tampered != url
    with pytest.raises(urllib.error.HTTPError) as refused:
        download(tampered)
    assert refused.value.code == 403


def test_no_bucket_refuses_url_requests_naming_output_format(extra_orchestrator):
    process = extra_orchestrator({"UNCLIP_IMAGES_URL": None})
    with pytest.raises(grpc.RpcError) as error:
        generate(process.address, pb.OUTPUT_FORMAT_URL, n=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_format" in error.value.details()
    assert "UNCLIP_IMAGES_URL" in error.value.details()
    # PNG requests are unaffected.
    assert generate(process.address, pb.OUTPUT_FORMAT_PNG, n=1).images[0].png[:4] == b"\x89PNG"


def test_s3_refusal_is_unavailable(extra_orchestrator):
    process = extra_orchestrator({"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(grpc.RpcError) as error:
        generate(process.address, pb.OUTPUT_FORMAT_URL, n=1)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "output_format=URL" in error.value.details()
    assert "S3 refused the credentials" in error.value.details()


def test_an_s3_model_carries_its_weights_hash(stack, s3, extra_orchestrator):
    """Every PNG names the model's weights manifest hash; for an s3:// model it is read from the bucket's
    manifest, and equals the hash of the folder that was pushed there."""
    from unclip.provenance.stamp import model_identity
    from unclip.storage import push_model

    url = "s3://unclip-models/weights/tiny"
    push_model(stack.model, url, s3.config)
    local_name, local_hash = model_identity(stack.model)
    process = extra_orchestrator({"UNCLIP_MODEL": url})
    png = generate(process.address, pb.OUTPUT_FORMAT_PNG, n=1).images[0].png
    text = PIL.Image.open(io.BytesIO(png)).text
    assert text["unclip:model"] == "tiny" and len(local_hash) == 64
    assert text["unclip:model_sha256"] == local_hash


def test_bucket_without_s3_endpoint_does_not_start(extra_orchestrator):
    process = extra_orchestrator({"UNCLIP_S3_ENDPOINT": None}, wait=False)
    assert process.popen.wait(timeout=60) == 2
    assert "UNCLIP_S3_ENDPOINT" in process.log_path.read_text()


def test_settings_list_the_storage_variables():
    from unclip.runtime.settings import SETTINGS

    names = {s.env for s in SETTINGS.values()}
    assert {
        "UNCLIP_IMAGES_URL",
        "UNCLIP_S3_ENDPOINT",
        "UNCLIP_S3_PUBLIC_ENDPOINT",
        "UNCLIP_MODEL_CACHE",
    } <= names
