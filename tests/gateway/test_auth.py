"""Keys at the HTTP door: the gateway forwards `Authorization: Bearer <key>` to the orchestrator, which
authenticates it. A wrong key is openai.AuthenticationError, a key without the scope PermissionDeniedError, a
used-up quota RateLimitError with `x-should-retry: false` (the SDK does not sleep through the window).

These tests start their own stack (`unclip up`'s Stack with its gateway), keys made with `unclip keys create`.
They are skipped while the orchestrator authenticates nobody (a wrong key is accepted by the shared stack).
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest

from tests.gateway.conftest import FAST


@pytest.fixture(scope="module")
def secured(gateway, stack, tmp_path_factory):
    """(own stack, its gateway URL), once the shared stack shows that the orchestrator checks keys."""
    probe = httpx.post(
        gateway + "/v1/images/generations",
        json={"prompt": "a dot", "response_format": "b64_json", **FAST},
        headers={"authorization": "Bearer sk-not-a-key"},
        timeout=60,
    )
    if probe.status_code == 200:
        pytest.skip("the orchestrator does not authenticate callers yet: it accepted a wrong key")
    assert probe.status_code == 401, probe.text
    from unclip.stack import Stack

    own = Stack(
        model=str(stack.model_dir),
        port=0,
        log_dir=tmp_path_factory.mktemp("auth-stack"),
        grace_seconds=5,
        http_port=0,
    )
    own.start(timeout=300)
    try:
        yield own, own.http_url
    finally:
        own.stop()


def make_key(own, name: str, *flags: str) -> str:
    argv = [sys.executable, "-m", "unclip", "keys", "create", name, *flags, "--keys-file", str(own.keys_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=own._env())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def client_for(url: str, key: str, retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=120)


def test_wrong_key_is_an_authentication_error(secured):
    _, url = secured
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(url, "sk-wrong").images.generate(prompt="a dot", extra_body=FAST)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert "sk-wrong" not in caught.value.message
    # Authentication comes first: a wrong key with a bad size is still a 401; /v1/models needs a key too.
    with pytest.raises(openai.AuthenticationError):
        client_for(url, "sk-wrong").images.generate(prompt="a dot", size="7x7")
    with pytest.raises(openai.AuthenticationError):
        client_for(url, "sk-wrong").models.list()


def test_scope_and_quota(secured):
    own, url = secured
    vary_only = make_key(own, "vary-only", "--scopes", "vary")
    two_a_minute = make_key(own, "two-a-minute", "--images-per-minute", "2")
    time.sleep(1.5)  # the keys file reloads within 1 s
    with pytest.raises(openai.PermissionDeniedError):
        client_for(url, vary_only).images.generate(prompt="a dot", extra_body=FAST)
    limited = client_for(url, two_a_minute)
    for _ in range(2):
        assert limited.images.generate(prompt="a dot", response_format="b64_json", extra_body=FAST).data
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        limited.images.generate(prompt="a dot", response_format="b64_json", extra_body=FAST)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert int(caught.value.response.headers["retry-after-ms"]) > 0
    assert time.monotonic() - started < 10  # refused at once, not after sleeping through the window
    # The other keys are unaffected.
    assert client_for(url, own.api_key).images.generate(prompt="a dot", extra_body=FAST).data
