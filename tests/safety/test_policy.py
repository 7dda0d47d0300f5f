"""Policy validation: every error names the file and the line; a good policy decides as written."""

from __future__ import annotations

import textwrap

import pytest

from services.safety.engine import SafetyEngine
from services.safety.filters.base import CheckInput
from services.safety.policy import PolicyError, load_policy

GOOD = """\
version: v1
categories:
  violence: {threshold: 0.5, action: block}
  nudity: {action: {default: withhold, prompt: flag}}
filters:
  words:
    type: blocklist
    terms:
      violence: [behead]
      nudity: [nude]
stages:
  prompt: [words]
"""


def write(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("categories: [1, 2\n", 2, "invalid YAML"),
        ("categories:\n  a: {action: block}\n  a: {action: flag}\n", 3, "duplicate key 'a'"),
        ("version: v1\ncatgories: {}\n", 2, "unknown key 'catgories'"),
        (
            "categories:\n  violence:\n    threshold: high\n    action: block\n",
            3,
            "threshold must be a number",
        ),
        ("categories:\n  violence:\n    threshold: 0.5\n    action: burn\n", 4, "'burn' is not one of"),
        ("categories:\n  violence: {threshold: 0.5}\n", 2, "action is required"),
        (
            "categories:\n  v:\n    action:\n      default: block\n      promt: flag\n",
            5,
            "unknown stage 'promt'",
        ),
        ("filters:\n  words:\n    type: blocklst\n", 3, "unknown filter type 'blocklst'"),
        ("filters:\n  words:\n    type: blocklist\n    term: {a: [x]}\n", 4, "unknown key 'term'"),
        (
            "filters:\n  words:\n    type: blocklist\n    terms:\n      a: nope\n",
            5,
            "must be a list of strings",
        ),
        (
            "filters:\n  e:\n    type: external\n    address: 127.0.0.1:1\n    fail_open: maybe\n",
            5,
            "fail_open",
        ),
        ("filters:\n  e:\n    type: external\n", 3, "address"),
        ("filters:\n  e:\n    type: external\n    address: h:1\n    timeout_seconds: -1\n", 5, "positive"),
        ("stages:\n  prompt: [words]\n", 2, "no filter named 'words'"),
        ("stages:\n  output: []\n", 2, "unknown stage 'output'"),
        (GOOD + "  final_output:\n    - words\n", 14, "cannot check images"),
        (
            "filters:\n  c:\n    type: clip_concepts\n    concepts:\n"
            "      - {category: x, embedding: [0, 0]}\n",
            5,
            "non-zero",
        ),
        (
            "filters:\n  t:\n    type: text_classifier\n    path: /nonexistent\n    labels: {a: b}\n",
            4,
            "not a folder",
        ),
    ],
)
def test_errors_name_the_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(error.value).startswith(f"{path}:{line}:"), str(error.value)
    assert message in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy"):
        load_policy(str(tmp_path / "absent.yaml"))


def test_good_policy_decides_per_category_and_stage(tmp_path):
    engine = SafetyEngine(write(tmp_path, GOOD), audit=None)
    engine.load()
    assert engine.policy.version == "v1"

    def decide(prompt):
        decision = engine.check(CheckInput("prompt", prompt=prompt))
        return decision.action, decision.verdicts[0].categories

    assert decide("a b3h3ad scene") == ("block", ["violence"])
    assert decide("a nude statue") == ("flag", ["nudity"])  # per-stage action: flag on prompts
    assert decide("a nude statue, behead it") == ("block", ["violence"])  # the strongest action wins
    assert decide("a quiet lake") == ("allow", [])


def test_withhold_on_a_prompt_blocks(tmp_path):
    engine = SafetyEngine(write(tmp_path, GOOD.replace("prompt: flag", "prompt: withhold")), audit=None)
    engine.load()
    assert engine.check(CheckInput("prompt", prompt="nude")).action == "block"


def test_version_defaults_to_a_hash_of_the_file(tmp_path):
    path = write(tmp_path, GOOD.replace("version: v1\n", ""))
    assert load_policy(path).version.startswith("sha256:")


def test_default_policy_is_valid():
    from services.safety.__main__ import DEFAULT_POLICY

    policy = load_policy(DEFAULT_POLICY)
    assert policy.stages["prompt"] == ["words"]
