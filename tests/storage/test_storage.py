"""Weights, images and presigned URLs against a real S3 server that enforces SigV4 (SeaweedFS)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from unclip import storage
from unclip.storage import MANIFEST_NAME, S3Config, StorageError

ROOT = Path(__file__).resolve().parents[2]


def _unique_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _storage_env(config: S3Config, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "UNCLIP_S3_ENDPOINT": config.endpoint,
        "AWS_ACCESS_KEY_ID": config.access_key,
        "AWS_SECRET_ACCESS_KEY": config.secret_key,
        "UNCLIP_MODEL_CACHE": str(cache),
    }


def _write_blob_model(folder: Path, big_bytes: int) -> Path:
    """A folder shaped like a model (nested folders, one large file) for the cache mechanics."""
    (folder / "decoder").mkdir(parents=True)
    (folder / "decoder" / "config.json").write_text('{"sample_size": 32}')
    (folder / "decoder" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(big_bytes))
    (folder / "prior_scheduler").mkdir()
    (folder / "prior_scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from unclip.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(folder)
    return folder


def test_model_round_trips_through_the_bucket_and_loads(s3, tiny_model, tmp_path):
    from unclip import models

    url = f"s3://{_unique_bucket()}/karlo/tiny"
    manifest = storage.push_model(tiny_model, url, s3.config)
    assert set(manifest["files"]) == {
        p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file()
    }

    result = storage.fetch_model_detailed(url, tmp_path / "cache", s3.config)
    assert sorted(result.downloaded) == sorted(manifest["files"])
    assert storage.verify_model_dir(result.path, manifest) == []
    for rel in manifest["files"]:
        assert (result.path / rel).read_bytes() == (tiny_model / rel).read_bytes()

    # The cached folder loads exactly as the original does.
    original, cached = models.load_prior(tiny_model), models.load_prior(result.path)
    for (name, a), (_, b) in zip(original.state_dict().items(), cached.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert models.tokenizer_max_length(result.path) == models.tokenizer_max_length(tiny_model)

    # A second start is a cache hit: nothing downloaded, same folder.
    again = storage.fetch_model_detailed(url, tmp_path / "cache", s3.config)
    assert again.path == result.path and again.downloaded == []


def test_multipart_upload_is_verified_by_sha256_not_etag(s3, tmp_path):
    model = _write_blob_model(tmp_path / "m", big_bytes=40 << 20)  # > PART_BYTES: a multipart upload
    bucket = _unique_bucket()
    storage.push_model(model, f"s3://{bucket}/blob", s3.config)
    key = "blob/decoder/diffusion_pytorch_model.safetensors"
    etag = s3.client().stat_object(bucket, key).etag
    assert "-" in etag  # multipart ETag: md5 of part md5s, not a content hash
    path = storage.fetch_model(f"s3://{bucket}/blob", tmp_path / "cache", s3.config)
    assert storage.sha256_file(path / "decoder/diffusion_pytorch_model.safetensors") == storage.sha256_file(
        model / "decoder/diffusion_pytorch_model.safetensors"
    )


def test_wrong_credentials_are_refused(s3, tmp_path):
    model = _write_blob_model(tmp_path / "m", big_bytes=1024)
    url = f"s3://{_unique_bucket()}/m"
    storage.push_model(model, url, s3.config)

    wrong_secret = dataclasses.replace(s3.config, secret_key="not-the-secret")
    with pytest.raises(StorageError, match="refused the credentials"):
        storage.fetch_model(url, tmp_path / "cache", wrong_secret)
    unknown_key = dataclasses.replace(s3.config, access_key="nobody")
    with pytest.raises(StorageError, match=r"InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch"):
        storage.fetch_model(url, tmp_path / "cache", unknown_key)
    anonymous = dataclasses.replace(s3.config, access_key=None, secret_key=None)
    with pytest.raises(StorageError, match="AccessDenied"):
        storage.fetch_model(url, tmp_path / "cache", anonymous)
    # A HEAD request (bucket check) carries no error body: S3 answers a plain 403 AccessDenied there.
    with pytest.raises(StorageError, match="refused the credentials|denied access"):
        storage.push_model(model, f"s3://{_unique_bucket()}/m", wrong_secret)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_missing_bucket_and_missing_model_say_so(s3, tmp_path):
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.fetch_model(f"s3://{_unique_bucket()}/karlo", tmp_path, s3.config)
    bucket = _unique_bucket()
    s3.client().make_bucket(bucket)
    with pytest.raises(StorageError, match=f"no model there .*{MANIFEST_NAME}"):
        storage.fetch_model(f"s3://{bucket}/nothing-here", tmp_path, s3.config)
    with pytest.raises(ValueError, match="^model must look like s3://bucket/prefix"):
        storage.fetch_model("s3:/bucket", tmp_path, s3.config)
    with pytest.raises(ValueError, match="^model: 'B_1' is not an S3 bucket name"):
        storage.fetch_model("s3://B_1/x", tmp_path, s3.config)


def test_object_that_does_not_match_the_manifest_is_never_trusted(s3, tmp_path):
    model = _write_blob_model(tmp_path / "m", big_bytes=4096)
    bucket = _unique_bucket()
    storage.push_model(model, f"s3://{bucket}/m", s3.config)
    # Someone overwrites one object after the push: same size, other bytes.
    storage.put_bytes(s3.client(), bucket, "m/decoder/diffusion_pytorch_model.safetensors", os.urandom(4096))
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match="does not match the manifest"):
        storage.fetch_model(f"s3://{bucket}/m", cache, s3.config)
    names = [p.name for p in cache.rglob("*")]
    assert (
        "diffusion_pytorch_model.safetensors" not in names
    )  # neither under its name nor as a finished folder
    assert not [p for p in cache.rglob("*") if p.is_dir() and len(p.name) == 64]


def _manifest_digest(client, bucket: str, prefix: str) -> str:
    return storage.read_manifest(client, bucket, prefix)[1]


def test_interrupted_download_leaves_nothing_trusted_and_resumes(s3, tmp_path):
    model = _write_blob_model(tmp_path / "m", big_bytes=96 << 20)
    bucket = _unique_bucket()
    url = f"s3://{bucket}/m"
    storage.push_model(model, url, s3.config)
    cache = tmp_path / "cache"
    parent = cache / bucket / "m"
    digest = _manifest_digest(s3.client(), bucket, "m")
    part = parent / f"{digest}.staging/decoder/diffusion_pytorch_model.safetensors.part"

    # A real process pulling the model is killed (SIGKILL, as the OOM killer would) mid-download.
    pull = [sys.executable, "-m", "unclip.storage", "pull", url]
    proc = subprocess.Popen(pull, env=_storage_env(s3.config, cache), cwd=ROOT, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.stat().st_size > 0:
            proc.send_signal(signal.SIGSTOP)  # freeze first, so the size we see is what the crash leaves
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    stdout = proc.stdout.read()
    proc.stdout.close()
    assert stdout == b"", "the download finished before it could be interrupted; the test proved nothing"
    assert part.exists() and part.stat().st_size < 96 << 20  # a half-written file exists ...
    assert not (parent / digest).exists()  # ... but no folder a later start would trust
    assert not (parent / f"{digest}.staging/decoder/diffusion_pytorch_model.safetensors").exists()

    result = storage.fetch_model_detailed(url, cache, s3.config)
    assert result.path == parent / digest
    manifest = storage.read_manifest(s3.client(), bucket, "m")[0]
    assert storage.verify_model_dir(result.path, manifest) == []
    assert not list(result.path.rglob("*.part"))
    # The small file that was verified before the crash was kept, not downloaded again.
    assert result.downloaded == [
        "decoder/diffusion_pytorch_model.safetensors",
        "prior_scheduler/scheduler_config.json",
    ]


def test_concurrent_cache_fills_download_once(s3, tmp_path):
    model = _write_blob_model(tmp_path / "m", big_bytes=8 << 20)
    url = f"s3://{_unique_bucket()}/m"
    manifest = storage.push_model(model, url, s3.config)
    cache = tmp_path / "cache"
    env = _storage_env(s3.config, cache)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "unclip.storage", "pull", url], env=env, cwd=ROOT, stdout=subprocess.PIPE
        )
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out))
    assert len({r["path"] for r in results}) == 1  # every process got the same folder
    downloads = [r["downloaded"] for r in results if r["downloaded"]]
    assert len(downloads) == 1 and sorted(downloads[0]) == sorted(manifest["files"])  # exactly one filler
    assert storage.verify_model_dir(Path(results[0]["path"]), manifest) == []


def test_presigned_url_is_signed_for_the_public_endpoint_and_expires_in_an_hour(s3):
    bucket = _unique_bucket()
    storage.ensure_bucket(s3.client(), bucket)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(256)
    storage.put_bytes(s3.client(), bucket, "images/a.png", png, "image/png")

    port = s3.endpoint.rsplit(":", 1)[1]
    public = dataclasses.replace(s3.config, public_endpoint=f"localhost:{port}")
    url = storage.presigned_get_url(public, bucket, "images/a.png")
    assert url.startswith(f"http://localhost:{port}/{bucket}/images/a.png?")
    assert "X-Amz-Expires=3600" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == png
        assert response.headers["Content-Type"] == "image/png"

    # SigV4 signs the Host header: the same URL through another host name is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.replace(f"localhost:{port}", s3.endpoint), timeout=10)
    assert refused.value.code == 403


def test_config_from_environment():
    env = {
        "UNCLIP_S3_ENDPOINT": "https://s3.example.com",
        "UNCLIP_S3_PUBLIC_ENDPOINT": "http://files.example.com:8080",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "topsecret-value",
        "AWS_REGION": "eu-west-1",
    }
    config = S3Config.from_env(env)
    assert (config.endpoint, config.secure, config.region) == ("s3.example.com", True, "eu-west-1")
    assert (config.public_endpoint, config.public_secure) == ("files.example.com:8080", False)
    assert config.secret_key == "topsecret-value" and "topsecret" not in repr(config)  # kept out of logs
    with pytest.raises(StorageError, match="UNCLIP_S3_ENDPOINT is not set"):
        S3Config.from_env({})
    with pytest.raises(StorageError, match="UNCLIP_S3_ENDPOINT must be host:port"):
        S3Config.from_env({"UNCLIP_S3_ENDPOINT": "ftp://x"})


def test_cli_bad_reference_exits_2_naming_the_field():
    proc = subprocess.run(
        [sys.executable, "-m", "unclip.storage", "pull", "http://bucket/x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "UNCLIP_S3_ENDPOINT": "127.0.0.1:1"},
    )
    assert proc.returncode == 2
    assert "model must look like s3://bucket/prefix" in proc.stderr


def test_audit_segments_ship_to_the_bucket(s3, tmp_path, monkeypatch):
    """The safety service's real AuditLog shipping each closed segment with storage.ship_audit_segment."""
    from services.safety.audit import AuditLog

    bucket = _unique_bucket()
    storage.ensure_bucket(s3.client(), bucket)
    for name, value in _storage_env(s3.config, tmp_path / "cache").items():
        if name.startswith(("UNCLIP_", "AWS_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNCLIP_AUDIT_URL", f"s3://{bucket}/audit/node-a")
    audit = AuditLog(tmp_path / "audit", max_segment_bytes=200, on_segment_closed=storage.ship_audit_segment)
    try:
        for i in range(6):
            audit.append({"event": "check", "i": i, "decision": "allow"})
        audit.rotate()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list((tmp_path / "audit").glob("*.shipped"))) < 2:
            time.sleep(0.05)
    finally:
        audit.close()
    closed = sorted(p for p in (tmp_path / "audit").iterdir() if p.name.endswith(".shipped"))
    assert len(closed) >= 2
    shipped = {o.object_name: o for o in s3.client().list_objects(bucket, prefix="audit/node-a/")}
    assert len(shipped) >= 2
    for marker in closed:
        segment = marker.with_name(marker.name.removesuffix(".shipped"))
        assert storage.get_bytes(s3.client(), bucket, f"audit/node-a/{segment.name}") == segment.read_bytes()


def test_cli_makes_buckets(s3, tmp_path):
    names = [_unique_bucket(), _unique_bucket()]
    env = _storage_env(s3.config, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "unclip.storage", "mb", *names], env=env, cwd=ROOT)
    assert proc.returncode == 0
    for name in names:
        assert s3.client().bucket_exists(name)


def test_store_images_returns_working_presigned_urls(s3):
    bucket = _unique_bucket()
    storage.ensure_bucket(s3.client(), bucket)
    port = s3.endpoint.rsplit(":", 1)[1]
    public = dataclasses.replace(s3.config, public_endpoint=f"localhost:{port}")
    pngs = [b"\x89PNG\r\n\x1a\n" + os.urandom(64) for _ in range(3)]
    urls = storage.store_images(pngs, f"s3://{bucket}/generated", public, request_id="req-1")
    assert len(urls) == 3
    for i, (url, png) in enumerate(zip(urls, pngs, strict=True)):
        assert f"/{bucket}/generated/" in url and f"/req-1/{i}.png?" in url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == png
    with pytest.raises(ValueError, match="^UNCLIP_IMAGES_URL must look like s3://"):
        storage.store_images(pngs, "/tmp/images", public)


def test_unclip_models_push_and_pull_from_a_shell(s3, tiny_model, tmp_path):
    """As a user types them: `unclip models push DIR URL`, then `unclip models pull URL`."""
    unclip = Path(sys.executable).with_name("unclip")
    env = _storage_env(s3.config, tmp_path / "cache")
    url = f"s3://{_unique_bucket()}/models/tiny"
    push = subprocess.run(
        [str(unclip), "models", "push", str(tiny_model), url], env=env, capture_output=True, text=True
    )
    assert push.returncode == 0, push.stderr
    pull = subprocess.run([str(unclip), "models", "pull", url], env=env, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stderr
    path = Path(json.loads(pull.stdout)["path"])
    assert path.is_relative_to(tmp_path / "cache")
    manifest = storage.read_manifest(s3.client(), url.split("/")[2], "models/tiny")[0]
    assert storage.verify_model_dir(path, manifest) == []
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    refused = subprocess.run([str(unclip), "models", "pull", url], env=wrong, capture_output=True, text=True)
    assert refused.returncode == 1 and "refused the credentials" in refused.stderr
