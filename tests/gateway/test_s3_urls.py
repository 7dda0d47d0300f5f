"""response_format=url with an image bucket: the gateway in front of an orchestrator that stores its PNGs in
a real S3 server (SeaweedFS, credentials enforced; tests/storage's fixture) answers the presigned S3 URL, not
a link of its own, and that URL downloads the PNG of the asked size from the bucket."""

from __future__ import annotations

import io
import os
import urllib.request
from urllib.parse import parse_qs, urlsplit

import PIL.Image
import pytest

from tests.gateway.conftest import FAST, running_gateway
from tests.storage.conftest import s3  # noqa: F401 (the fixture; it also puts s3server on the path)
from tests.storage.test_url_outputs import BUCKET, s3_env
from unclip.storage import ensure_bucket


@pytest.fixture(scope="module")
def bucket_gateway(s3, tmp_path_factory):  # noqa: F811 (s3: the fixture imported above)
    """A one-upsampler stack whose orchestrator has the bucket (no access control: tests/access has it),
    and the gateway in front of it; yields (gateway URL, S3 public endpoint)."""
    from unclip.stack import Stack
    from unclip.tiny import make_tiny_model

    ensure_bucket(s3.client(), BUCKET)
    model = make_tiny_model(tmp_path_factory.mktemp("s3-urls") / "model", variation=False)
    env = s3_env(s3, f"s3://{BUCKET}/gateway")
    logs = tmp_path_factory.mktemp("s3-urls-logs")
    stack = Stack(
        model=str(model), port=0, log_dir=logs, grace_seconds=5.0, extra_env=env, auth=False, tls=False
    )
    stack.start(timeout=300)
    try:
        with running_gateway(stack.address, dict(os.environ), logs / "gateway.log") as url:
            yield url, env["UNCLIP_S3_PUBLIC_ENDPOINT"]
    finally:
        stack.stop()


def test_url_is_a_presigned_s3_url_to_the_png(bucket_gateway):
    from openai import OpenAI

    gateway, public_endpoint = bucket_gateway
    client = OpenAI(base_url=gateway + "/v1", api_key="sk-unclip-local", max_retries=0, timeout=120)
    result = client.images.generate(prompt="a red circle", size="32x32", extra_body={"seed": 4, **FAST})
    [image] = result.data
    assert image.b64_json is None and image.model_extra["seed"] == 4
    parts = urlsplit(image.url)
    assert parts.netloc == public_endpoint and not image.url.startswith(gateway)  # S3's, not the gateway's
    assert parts.path.startswith(f"/{BUCKET}/gateway/")
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["3600"]
    assert query["X-Amz-Signature"]
    with urllib.request.urlopen(image.url, timeout=30) as response:
        data = response.read()
    png = PIL.Image.open(io.BytesIO(data))
    assert png.format == "PNG" and png.size == (32, 32)
