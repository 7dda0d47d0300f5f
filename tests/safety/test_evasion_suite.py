"""Evasion suite through the real safety service.

Obfuscated variants of listed terms must be refused (>= 99 %); benign prompts that contain listed strings
inside innocent words or across word boundaries must pass (<= 1 % refused)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import yaml
from evasion_corpus import TERMS, benign_prompts, evasive_variants

from unclip.v1 import safety_pb2


def suite_policy() -> str:
    return yaml.safe_dump(
        {
            "version": "evasion-suite",
            "categories": {c: {"threshold": 0.5, "action": "block"} for c in TERMS},
            "filters": {"words": {"type": "blocklist", "terms": TERMS}},
            "stages": {"prompt": ["words"]},
        },
        allow_unicode=True,
    )


def test_evasion_suite_through_the_service(start_safety, capsys):
    safety = start_safety(suite_policy())
    evasive = evasive_variants(240, seed=0)
    benign = benign_prompts()
    assert len(evasive) >= 200 and len(benign) >= 200

    def action(prompt: str) -> int:
        return safety.stub.CheckPrompt(safety_pb2.CheckPromptRequest(prompt=prompt), timeout=30).action

    with ThreadPoolExecutor(8) as pool:
        evasive_actions = list(pool.map(action, [p for p, _ in evasive]))
        benign_actions = list(pool.map(action, benign))

    missed = [p for (p, _), a in zip(evasive, evasive_actions, strict=True) if a != safety_pb2.ACTION_BLOCK]
    refused = [p for p, a in zip(benign, benign_actions, strict=True) if a != safety_pb2.ACTION_ALLOW]
    caught_rate = 1 - len(missed) / len(evasive)
    refused_rate = len(refused) / len(benign)
    with capsys.disabled():
        print(
            f"\nevasion suite: {len(evasive)} obfuscated, caught {caught_rate:.1%}; "
            f"{len(benign)} benign, refused {refused_rate:.1%}"
        )
    assert caught_rate >= 0.99, f"missed: {missed}"
    assert refused_rate <= 0.01, f"benign refused: {refused}"
    # Every decision was audited, each with the term that matched (the audit log's own business, not the
    # caller's).
    records = safety.records()
    assert len(records) == len(evasive) + len(benign)
    assert sum(1 for r in records if r["action"] == "block") == len(evasive) - len(missed) + len(refused)
