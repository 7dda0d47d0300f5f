"""Signed, expiring links to PNGs the gateway keeps itself: `response_format=url` without a bucket (and the
frames and animations of interpolations and text diffs, which the orchestrator always answers as bytes).

A link is `/v1/images/files/<token>.<png|gif|webp>?expires=<unix>&signature=<hmac>`: the token is random
(128 bits), the signature an HMAC-SHA256 over token and expiry with the gateway's secret, so neither can be
guessed or stretched. The images live in this process's memory, oldest dropped first beyond a byte budget;
with several gateway replicas a link is served by the replica that made it, so deployments with more than one
replica give the orchestrator a bucket (UNCLIP_IMAGES_URL), whose presigned URLs the gateway then passes on
unchanged (frames and animations stay the gateway's: ask b64_json behind several replicas).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkConfig:
    ttl_seconds: float = 3600.0  # how long a link works (OpenAI's URLs: 60 minutes)
    max_bytes: int = 512 * 1024 * 1024  # memory for the PNGs; the oldest go first beyond it
    secret: bytes = b""  # HMAC key; empty: a random one per process (links die with the process anyway)


class LinkStore:
    """Image bytes behind signed links; thread-safe."""

    def __init__(self, config: LinkConfig):
        self.config = config
        self._secret = config.secret or secrets.token_bytes(32)
        self._lock = threading.Lock()
        # token -> (expires, bytes, extension); a link works under its own extension only
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0

    def _sign(self, token: str, expires: int) -> str:
        return hmac.new(self._secret, f"{token}.{expires}".encode(), hashlib.sha256).hexdigest()

    def put(self, png: bytes, extension: str = "png") -> str:
        """Stores `png` (or a GIF / WebP: `extension`); returns the link's path and query (prefix it with the
        gateway's base URL)."""
        token = secrets.token_urlsafe(16)
        expires = int(time.time() + self.config.ttl_seconds)
        with self._lock:
            self._drop_expired()
            self._items[token] = (expires, png, extension)
            self._bytes += len(png)
            while self._bytes > self.config.max_bytes and len(self._items) > 1:
                _, (_, old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return (
            f"/v1/images/files/{token}.{extension}?expires={expires}&signature={self._sign(token, expires)}"
        )

    def get(self, token: str, expires: int, signature: str, extension: str = "png") -> bytes | None:
        """The bytes, or None when the signature is wrong, the link expired, its bytes were dropped or it was
        asked under another extension."""
        if not hmac.compare_digest(self._sign(token, expires), signature) or expires < time.time():
            return None
        with self._lock:
            item = self._items.get(token)
        return item[1] if item and item[2] == extension else None

    def _drop_expired(self) -> None:
        now = time.time()
        while self._items:
            token, (expires, png, _) = next(iter(self._items.items()))
            if expires >= now:
                return
            del self._items[token]
            self._bytes -= len(png)
