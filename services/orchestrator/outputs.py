"""OUTPUT_FORMAT_URL: the final PNGs go to a bucket and the caller gets presigned GET URLs.

The bucket is `UNCLIP_IMAGES_URL` (s3://bucket/prefix); the URLs are valid 60 minutes and signed for
`UNCLIP_S3_PUBLIC_ENDPOINT` (the name clients reach S3 by; SigV4 signs the Host header). Storage itself lives
in unclip/storage.py; this only maps its failures to gRPC statuses.
"""

from __future__ import annotations

import grpc

from unclip.runtime.errors import StatusError
from unclip.storage import S3Config, StorageError, parse_s3_url, store_images


class ImageStore:
    """Stores a request's PNGs under one s3:// prefix; returns presigned URLs."""

    def __init__(self, url: str, config: S3Config):
        parse_s3_url(url, "UNCLIP_IMAGES_URL")  # ValueError naming the variable: a startup error
        self.url = url  # s3://bucket/prefix
        self.config = config  # endpoint, public endpoint, credentials

    @classmethod
    def from_settings(cls, images_url: str) -> ImageStore | None:
        """None when no bucket is configured (URL requests are then refused); raises on bad settings."""
        if not images_url:
            return None
        return cls(images_url, S3Config.from_env())

    def store(self, pngs: list[bytes], request_id: str) -> list[str]:
        """One presigned GET URL per PNG, in order; S3 failures are UNAVAILABLE (retry may succeed)."""
        try:
            return store_images(pngs, self.url, self.config, request_id=request_id)
        except StorageError as error:
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE, f"cannot store the images for output_format=URL: {error}"
            ) from error
