"""`POST /v1/content_provenance_checks`: the orchestrator's Verify answer in the OpenAI SDK's shape
(`client.content_provenance_checks.create(file=...)` -> `ContentProvenanceCheck`).

    {"object": "content_provenance_check", "created_at": 1700000000,
     "results": [{"type": "c2pa", "outcome": "detected", "validation_state": "trusted", "model": "..."}],
     "unclip_verdict": "intact", "unclip_summary": "intact: C2PA manifest signed by us, valid; ...",
     "unclip_watermark": {"checked": true, "found": true, "score": 31.2, "payload_matches": true},
     "unclip_manifest_failures": []}

The one result is c2pa's: `outcome` is "detected" when the file carries a manifest signed by this deployment
(valid or broken), `validation_state` is c2pa's state of whatever manifest is there ("not_present" without
one). OpenAI's second kind of result names a watermark of its own (`synthid`); this deployment's watermark is
not that one, so it is reported in `unclip_watermark`, and `unclip_verdict` (intact, altered, not_ours: the
rules of unclip/provenance/verify.py) combines both signals.
"""

from __future__ import annotations

import time
from typing import Any

from unclip.v1 import orchestrator_pb2

VERDICTS = {
    orchestrator_pb2.VERIFY_VERDICT_INTACT: "intact",
    orchestrator_pb2.VERIFY_VERDICT_ALTERED: "altered",
    orchestrator_pb2.VERIFY_VERDICT_NOT_OURS: "not_ours",
}
STATES = ("trusted", "valid", "invalid")  # c2pa's, lower-cased as the SDK's validation_state


def check_body(answer: orchestrator_pb2.VerifyResponse) -> dict[str, Any]:
    """The ContentProvenanceCheck body for one Verify answer."""
    state = answer.validation_state.lower()
    if not answer.manifest_present:
        state = "not_present"
    elif state not in STATES:
        state = "invalid"  # a manifest c2pa could not give a state to is not a valid one
    c2pa: dict[str, Any] = {
        "type": "c2pa",
        "outcome": "detected" if answer.manifest_ours else "not_detected",
        "validation_state": state,
    }
    verdict = VERDICTS.get(answer.verdict, "not_ours")
    if verdict == "intact" and answer.manifest_ours:
        # The metadata is covered by the manifest's hash only when the manifest is intact: then it is a fact.
        model = answer.metadata.get("unclip:model")
        if model:
            c2pa["model"] = model
    watermark: dict[str, Any] = {
        "checked": answer.watermark_checked,
        "found": answer.watermark_found,
        "score": answer.watermark_score,
        "payload_matches": answer.watermark_payload_matches
        if answer.HasField("watermark_payload_matches")
        else None,
    }
    return {
        "object": "content_provenance_check",
        "created_at": int(time.time()),
        "results": [c2pa],
        "unclip_verdict": verdict,
        "unclip_summary": answer.summary,
        "unclip_watermark": watermark,
        "unclip_manifest_failures": list(answer.manifest_failures),
    }


# The request body for /docs (the route reads the form itself, so every error keeps OpenAI's shape).
SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"}
                    },
                }
            }
        },
    }
}
