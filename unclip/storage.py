"""S3 / MinIO storage: model weights into a verified local cache, images and audit segments out.

Weights. `push_model(DIR, "s3://bucket/prefix")` uploads a Karlo-layout folder and then, last, a manifest
(`unclip-manifest.json`: every file's relative path, size and sha256). S3 ETags are not content hashes once
an upload is multipart, so the manifest is what a download is checked against. `fetch_model(url)` returns a
local folder holding exactly the manifest's files:

    <cache>/<bucket>/<prefix>/<manifest sha256>/          complete, verified copy (one atomic rename)
    <cache>/<bucket>/<prefix>/<manifest sha256>.staging/  files verified so far (a resumed fill keeps them)
    <cache>/<bucket>/<prefix>/<manifest sha256>.lock      flock: one process per node fills, others wait

Every file is streamed into `<name>.part`, hashed on the way, and renamed to its name only when size and
sha256 match the manifest; the folder is renamed into place only when every file is there. A crash at any
point therefore leaves no file (and no folder) that a later start trusts, and several pods starting at once
on one node download once. A new push (another manifest) lands in a new folder, so a running process never
sees its weights change under it.

Outputs. `put_bytes` stores an object; `presigned_get_url` signs a GET for the endpoint clients will use
(`UNCLIP_S3_PUBLIC_ENDPOINT`): SigV4 signs the Host header, so a URL signed for an in-cluster name fails
from outside.

Configuration (environment, see docs/operations.md): UNCLIP_S3_ENDPOINT, UNCLIP_S3_PUBLIC_ENDPOINT,
UNCLIP_S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, UNCLIP_MODEL_CACHE.

    python -m unclip.storage push DIR s3://bucket/prefix
    python -m unclip.storage pull s3://bucket/prefix [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError

MANIFEST_NAME = "unclip-manifest.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 1 << 20  # streaming buffer for hashing and downloads
PART_BYTES = 16 << 20  # multipart part size for uploads (S3 minimum is 5 MiB)
PRESIGN_EXPIRY = datetime.timedelta(minutes=60)  # as the OpenAI Images API's URLs


class StorageError(RuntimeError):
    """An S3 operation failed for a reason an operator can act on (credentials, bucket, missing model)."""


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # "host:port" the process talks to; a scheme (http:// or https://) sets `secure`
    access_key: str | None = field(default=None, repr=False)  # None: anonymous requests
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)  # temporary (STS) credentials
    region: str = "us-east-1"  # given explicitly so presigning never asks the server for its region
    secure: bool = False  # TLS to the endpoint
    public_endpoint: str | None = (
        None  # "host:port" (or URL) that presigned URLs are signed for; None: `endpoint`
    )
    public_secure: bool | None = None  # TLS in presigned URLs; None: same as `secure`

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> S3Config:
        env = os.environ if environ is None else environ
        raw = env.get("UNCLIP_S3_ENDPOINT", "")
        if not raw:
            raise StorageError(
                "UNCLIP_S3_ENDPOINT is not set: an s3:// reference needs the S3 endpoint (host:port)"
            )
        endpoint, secure = _split_endpoint(raw, default_secure=False)
        public_raw = env.get("UNCLIP_S3_PUBLIC_ENDPOINT", "")
        public, public_secure = (
            _split_endpoint(public_raw, default_secure=secure) if public_raw else (None, None)
        )
        return cls(
            endpoint=endpoint,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("UNCLIP_S3_REGION") or env.get("AWS_REGION") or "us-east-1",
            secure=secure,
            public_endpoint=public,
            public_secure=public_secure,
        )

    def client(self, public: bool = False) -> Minio:
        """A minio client for the endpoint (`public=True`: for the endpoint presigned URLs are made for)."""
        endpoint, secure = self.endpoint, self.secure
        if public and self.public_endpoint:
            endpoint = self.public_endpoint
            secure = self.secure if self.public_secure is None else self.public_secure
        return Minio(
            endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            session_token=self.session_token,
            secure=secure,
            region=self.region,
        )


def _split_endpoint(raw: str, default_secure: bool) -> tuple[str, bool]:
    """ "https://s3.example.com" -> ("s3.example.com", True); "minio:9000" -> ("minio:9000", default)."""
    if "://" not in raw:
        return raw.rstrip("/"), default_secure
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise StorageError(f"UNCLIP_S3_ENDPOINT must be host:port or http(s)://host:port, got {raw!r}")
    return parts.netloc, parts.scheme == "https"


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_s3_url(url: str, field_name: str = "model") -> tuple[str, str]:
    """ "s3://bucket/some/prefix" -> ("bucket", "some/prefix"); ValueError naming `field_name` otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{field_name} must look like s3://bucket/prefix, got {url!r}")
    if not _BUCKET_NAME.fullmatch(parts.netloc):
        raise ValueError(f"{field_name}: {parts.netloc!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    prefix = parts.path.strip("/")
    if ".." in prefix.split("/"):
        raise ValueError(f"{field_name} must not contain '..', got {url!r}")
    return parts.netloc, prefix


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Turns minio/urllib3 failures into StorageError messages that say what to fix."""
    try:
        yield
    except S3Error as error:
        hints = {
            "NoSuchBucket": "the bucket does not exist",
            "SignatureDoesNotMatch": "S3 refused the credentials (wrong AWS_SECRET_ACCESS_KEY?)",
            "InvalidAccessKeyId": "S3 does not know AWS_ACCESS_KEY_ID",
            "AccessDenied": "S3 denied access (credentials missing or not allowed)",
        }
        hint = hints.get(error.code, error.message)
        raise StorageError(f"{what}: {hint} [{error.code}]") from error
    except (HTTPError, OSError) as error:
        raise StorageError(f"{what}: cannot reach S3: {error}") from error


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(local_dir: Path) -> dict:
    """{"version": 1, "files": {posix path: {"size": int, "sha256": hex}}} for every file in the folder."""
    files = {}
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST_NAME or any(part.startswith(".") for part in Path(rel).parts):
            continue  # hidden files (.lock, editor droppings) are not part of a model
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise StorageError(f"{local_dir}: no files to push")
    return {"version": MANIFEST_VERSION, "files": files}


def _check_manifest(manifest: object, where: str) -> dict:
    ok = isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION
    files = manifest.get("files") if ok else None
    if not isinstance(files, dict) or not files:
        raise StorageError(f"{where}: not an unclip manifest (version {MANIFEST_VERSION} with files)")
    for rel, entry in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise StorageError(f"{where}: unsafe path {rel!r} in manifest")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or len(entry.get("sha256", "")) != 64
        ):
            raise StorageError(f"{where}: bad entry for {rel!r}")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Weights: push and fetch
# ----------------------------------------------------------------------------------------------------


def ensure_bucket(client: Minio, bucket: str) -> None:
    with _s3_errors(f"bucket {bucket!r}"):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)


def push_model(
    local_dir: str | Path, url: str, config: S3Config | None = None, create_bucket: bool = True
) -> dict:
    """Uploads every file of a model folder, then its manifest (last: readers never see a partial model)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir} is not a folder")
    bucket, prefix = parse_s3_url(url)
    client = (config or S3Config.from_env()).client()
    manifest = build_manifest(local_dir)
    if create_bucket:
        ensure_bucket(client, bucket)
    with _s3_errors(f"push to {url}"):
        for rel in manifest["files"]:
            client.fput_object(bucket, _key(prefix, rel), str(local_dir / rel), part_size=PART_BYTES)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        client.put_object(
            bucket, _key(prefix, MANIFEST_NAME), io.BytesIO(body), len(body), "application/json"
        )
    return manifest


def read_manifest(client: Minio, bucket: str, prefix: str) -> tuple[dict, str]:
    """The model's manifest and the sha256 of its bytes (the cache folder's name)."""
    url = f"s3://{bucket}/{prefix}"
    try:
        response = client.get_object(bucket, _key(prefix, MANIFEST_NAME))
    except S3Error as error:
        if error.code == "NoSuchKey":
            raise StorageError(
                f"{url}: no model there ({MANIFEST_NAME} missing; "
                "upload one with `python -m unclip.storage push`)"
            ) from error
        with _s3_errors(f"read {url}"):
            raise
    except (HTTPError, OSError) as error:
        raise StorageError(f"read {url}: cannot reach S3: {error}") from error
    try:
        body = response.read()
    finally:
        response.close()
        response.release_conn()
    try:
        manifest = json.loads(body)
    except ValueError as error:
        raise StorageError(f"{url}/{MANIFEST_NAME}: not JSON: {error}") from error
    return _check_manifest(manifest, f"{url}/{MANIFEST_NAME}"), hashlib.sha256(body).hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("UNCLIP_MODEL_CACHE"):
        return Path(os.environ["UNCLIP_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unclip" / "models"


@dataclass
class FetchResult:
    path: Path  # the verified local folder
    downloaded: list[str]  # files this call downloaded (empty on a cache hit)


def fetch_model(url: str, cache_dir: str | Path | None = None, config: S3Config | None = None) -> Path:
    """`s3://bucket/prefix` -> a local folder with the model's files, each verified against the manifest."""
    return fetch_model_detailed(url, cache_dir, config).path


def fetch_model_detailed(
    url: str, cache_dir: str | Path | None = None, config: S3Config | None = None
) -> FetchResult:
    bucket, prefix = parse_s3_url(url)
    client = (config or S3Config.from_env()).client()
    manifest, digest = read_manifest(client, bucket, prefix)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parent = base / bucket / (prefix or "_root")
    final = parent / digest
    if final.is_dir():  # renamed into place only when complete and verified
        return FetchResult(final, [])
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f"{digest}.lock", "a+b") as lock:
        # One filler per node; the others block here and then find the folder in place.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return FetchResult(final, [])
        staging = parent / f"{digest}.staging"
        downloaded = _fill(client, bucket, prefix, manifest, staging)
        _fsync_dir(staging)
        os.replace(staging, final)
        _fsync_dir(parent)
    return FetchResult(final, downloaded)


def _fill(client: Minio, bucket: str, prefix: str, manifest: dict, staging: Path) -> list[str]:
    """Makes `staging` hold every manifest file, verified; keeps what an interrupted fill verified."""
    downloaded = []
    for rel, entry in manifest["files"].items():
        target = staging / rel
        if (
            target.is_file()
            and target.stat().st_size == entry["size"]
            and sha256_file(target) == entry["sha256"]
        ):
            continue  # verified by an earlier, interrupted fill (only verified files ever get their name)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        digest, size = hashlib.sha256(), 0
        with _s3_errors(f"download s3://{bucket}/{_key(prefix, rel)}"):
            response = client.get_object(bucket, _key(prefix, rel))
            try:
                with open(part, "wb") as out:
                    for chunk in response.stream(CHUNK_BYTES):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
                response.release_conn()
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            part.unlink(missing_ok=True)
            raise StorageError(
                f"s3://{bucket}/{_key(prefix, rel)}: content does not match the manifest "
                f"(size {size} vs {entry['size']}, "
                f"sha256 {digest.hexdigest()[:12]} vs {entry['sha256'][:12]})"
            )
        os.replace(part, target)
        downloaded.append(rel)
    # Anything else in staging (a stale .part, a file no longer in the manifest) is not part of the model.
    expected = {staging / rel for rel in manifest["files"]}
    for path in sorted(staging.rglob("*"), reverse=True):
        if path.is_file() and path not in expected:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return downloaded


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_model_dir(local_dir: str | Path, manifest: dict) -> list[str]:
    """Paths under `local_dir` whose size or sha256 differ from the manifest (or that are missing)."""
    bad = []
    for rel, entry in manifest["files"].items():
        path = Path(local_dir) / rel
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            bad.append(rel)
    return bad


def clear_cache(cache_dir: str | Path) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Outputs: images and audit segments
# ----------------------------------------------------------------------------------------------------


def put_bytes(
    client: Minio, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
) -> None:
    with _s3_errors(f"put s3://{bucket}/{key}"):
        client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)


def get_bytes(client: Minio, bucket: str, key: str) -> bytes:
    with _s3_errors(f"get s3://{bucket}/{key}"):
        response = client.get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()


def presigned_get_url(
    config: S3Config, bucket: str, key: str, expires: datetime.timedelta = PRESIGN_EXPIRY
) -> str:
    """A GET URL valid for `expires`, signed for the public endpoint (computed locally, no request)."""
    with _s3_errors(f"presign s3://{bucket}/{key}"):
        return config.client(public=True).presigned_get_object(bucket, key, expires=expires)


def store_images(
    images: list[bytes],
    url: str,
    config: S3Config | None = None,
    request_id: str | None = None,
    content_type: str = "image/png",
    expires: datetime.timedelta = PRESIGN_EXPIRY,
) -> list[str]:
    """Stores a request's images under `url` (s3://bucket/prefix) and returns a presigned GET URL for each.

    Keys are `<prefix>/<yyyy>/<mm>/<dd>/<request id>/<i>.png` (a bucket lifecycle rule can expire by date).
    For the orchestrator's `response_format=url`: `store_images(pngs, os.environ["UNCLIP_IMAGES_URL"])`.
    """
    bucket, prefix = parse_s3_url(url, "UNCLIP_IMAGES_URL")
    config = config or S3Config.from_env()
    client = config.client()
    day = datetime.datetime.now(datetime.UTC).strftime("%Y/%m/%d")
    folder = _key(prefix, f"{day}/{request_id or uuid.uuid4().hex}")
    suffix = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(content_type, "bin")
    urls = []
    for i, data in enumerate(images):
        key = f"{folder}/{i}.{suffix}"
        put_bytes(client, bucket, key, data, content_type)
        urls.append(presigned_get_url(config, bucket, key, expires))
    return urls


def ship_audit_segment(path: str | Path) -> str:
    """Uploads one closed audit segment to UNCLIP_AUDIT_URL (s3://bucket/prefix); returns its s3:// URL.

    The safety service calls it off the request path when UNCLIP_AUDIT_SHIP=unclip.storage:ship_audit_segment.
    Segments are immutable once closed, so a retried upload of the same file is harmless.
    """
    target = os.environ.get("UNCLIP_AUDIT_URL", "")
    if not target:
        raise StorageError(
            "UNCLIP_AUDIT_URL is not set: where should audit segments go (s3://bucket/prefix)?"
        )
    bucket, prefix = parse_s3_url(target, "UNCLIP_AUDIT_URL")
    path = Path(path)
    key = _key(prefix, path.name)
    client = S3Config.from_env().client()
    with _s3_errors(f"ship {path} to s3://{bucket}/{key}"):
        client.fput_object(bucket, key, str(path), content_type="application/x-ndjson", part_size=PART_BYTES)
    return f"s3://{bucket}/{key}"


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unclip.storage", description="Model weights in S3 / MinIO."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a Karlo-layout folder with its sha256 manifest")
    push.add_argument("dir")
    push.add_argument("url", help="s3://bucket/prefix")
    pull = commands.add_parser("pull", help="download into the verified local cache; prints the folder")
    pull.add_argument("url", help="s3://bucket/prefix")
    pull.add_argument("--cache", default=None, help="cache folder [env UNCLIP_MODEL_CACHE]")
    make_bucket = commands.add_parser("mb", help="create buckets (those that exist are left as they are)")
    make_bucket.add_argument("buckets", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "mb":
            client = S3Config.from_env().client()
            for bucket in args.buckets:
                parse_s3_url(f"s3://{bucket}", "bucket")
                ensure_bucket(client, bucket)
            print(f"buckets ready: {' '.join(args.buckets)}")
        elif args.command == "push":
            manifest = push_model(args.dir, args.url)
            print(f"pushed {len(manifest['files'])} files to {args.url}")
        else:
            result = fetch_model_detailed(args.url, args.cache)
            print(json.dumps({"path": str(result.path), "downloaded": result.downloaded}))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
