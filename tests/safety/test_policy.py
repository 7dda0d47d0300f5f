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


def test_threshold_precedence_filter_override_then_concept_then_category(tmp_path):
    import numpy as np

    policy = """\
    categories:
      gore: {threshold: 0.5, action: withhold}
    filters:
      own: {type: clip_concepts, concepts: [{category: gore, embedding: [1, 0], threshold: 0.95}]}
      plain: {type: clip_concepts, concepts: [{category: gore, embedding: [1, 0]}]}
      strict: {type: clip_concepts, thresholds: {gore: 0.99}, concepts: [{category: gore, embedding: [1, 0],
               threshold: 0.2}]}
    stages:
      final_output: [{name}]
    """
    embeds = np.array([[1, 0.2], [1, 0.05], [1, 1.33]], np.float32)  # cosines 0.981, 0.9988, 0.60

    def withheld(name: str) -> list[bool]:
        engine = SafetyEngine(write(tmp_path, policy.replace("{name}", name)), audit=None)
        engine.load()
        item = CheckInput("final_output", images=np.zeros((3, 3, 4, 4), np.float32), image_embeds=embeds)
        return [v.action == "withhold" for v in engine.check(item).verdicts]

    assert withheld("plain") == [True, True, True]  # the category's 0.5
    assert withheld("own") == [True, True, False]  # the concept's 0.95
    assert withheld("strict") == [False, True, False]  # the filter's override 0.99 beats the concept's 0.2
