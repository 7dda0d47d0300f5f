"""The HTTP gateway in front of the shared stack: one `python -m services.gateway` process per module.

`gateway` yields its base URL (http://127.0.0.1:PORT); `api_key` is the key the shared stack's clients use
(from `stack.env`, empty while the orchestrator does not authenticate). Requests ask for 2 steps per stage
(FAST) so each costs well under a second on the tiny model.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

FAST = {
    "prior_num_inference_steps": 2,
    "decoder_num_inference_steps": 2,
    "super_res_num_inference_steps": [2],
}


@contextlib.contextmanager
def running_gateway(
    orchestrator: str, env: dict[str, str], log_path: Path, *args: str, probe: str = "/readyz"
) -> Iterator[str]:
    """Starts the gateway on a free port in front of `orchestrator`; yields its URL once `probe` says 200."""
    argv = [sys.executable, "-m", "services.gateway", "--orchestrator-addr", orchestrator]
    argv += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if url is None:
                match = re.search(r"listening on (\S+):(\d+)", log_path.read_text(errors="replace"))
                url = f"http://127.0.0.1:{match.group(2)}" if match else None
            if url is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + probe, timeout=2).status_code == 200:
                        break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the gateway did not get ready; its log:\n{log_path.read_text()}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with running_gateway(stack.address, stack.env, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def api_key(stack) -> str:
    return stack.env.get("UNCLIP_API_KEY", "") or "sk-unclip-local"


@pytest.fixture(scope="module")
def client(gateway, api_key):
    from openai import OpenAI

    return OpenAI(base_url=gateway + "/v1", api_key=api_key, max_retries=0, timeout=120)
