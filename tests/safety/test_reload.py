"""Hot reload: a changed policy file (or SIGHUP) takes effect without a restart; a bad one is rejected and the
old one kept."""

from __future__ import annotations

import signal

from safety_helpers import prompt_request

from unclip.v1 import safety_pb2

POLICY = """\
version: {version}
categories:
  violence: {{action: {action}}}
filters:
  words: {{type: blocklist, terms: {{violence: [{term}]}}}}
stages:
  prompt: [words]
"""


def action(safety, prompt: str) -> int:
    return safety.stub.CheckPrompt(prompt_request(prompt), timeout=10).action


def test_changed_file_takes_effect_and_a_bad_one_is_rejected(start_safety):
    safety = start_safety(POLICY.format(version="v1", action="block", term="behead"))
    assert action(safety, "behead him") == safety_pb2.ACTION_BLOCK
    assert action(safety, "a massacre") == safety_pb2.ACTION_ALLOW

    safety.write_policy(POLICY.format(version="v2", action="flag", term="massacre"))
    safety.wait_version("v2")
    assert action(safety, "a massacre") == safety_pb2.ACTION_FLAG
    assert action(safety, "behead him") == safety_pb2.ACTION_ALLOW

    # A bad file: rejected, v2 stays in force, and the rejection (naming the line) is in the log and the audit
    # trail.
    safety.write_policy(POLICY.format(version="v3", action="burn", term="massacre"))
    safety.wait_rejected(1)
    reply = safety.stub.CheckPrompt(prompt_request("a massacre"), timeout=10)
    assert reply.policy_version == "v2" and reply.action == safety_pb2.ACTION_FLAG
    [rejected] = safety.records("policy_rejected")
    assert ":3: categories.violence.action: 'burn' is not one of" in rejected["error"]
    assert rejected["kept_version"] == "v2"
    assert "policy reload rejected, keeping version v2" in safety.process.text()

    # Fixing the file recovers.
    safety.write_policy(POLICY.format(version="v4", action="block", term="massacre"))
    safety.wait_version("v4")
    assert action(safety, "a massacre") == safety_pb2.ACTION_BLOCK
    versions = [r["version"] for r in safety.records("policy_loaded")]
    assert versions == ["v1", "v2", "v4"]


def test_sighup_reloads(start_safety):
    safety = start_safety(
        POLICY.format(version="h1", action="block", term="behead"), poll=0
    )  # no file watching
    safety.write_policy(POLICY.format(version="h2", action="block", term="massacre"))
    assert safety.stub.CheckPrompt(prompt_request("x y"), timeout=10).policy_version == "h1"
    safety.proc.send_signal(signal.SIGHUP)
    safety.wait_version("h2")
    assert action(safety, "a massacre") == safety_pb2.ACTION_BLOCK
    # A bad file on SIGHUP: kept h2, the service still SERVING and answering.
    safety.write_policy("categories: [unclosed\n")
    safety.proc.send_signal(signal.SIGHUP)
    safety.wait_rejected(1)
    assert safety.stub.CheckPrompt(prompt_request("x y"), timeout=10).policy_version == "h2"
