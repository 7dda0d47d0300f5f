"""The refusal a client can act on: INVALID_ARGUMENT carrying a google.rpc.ErrorInfo with reason
CONTENT_POLICY_VIOLATION (as the OpenAI API answers HTTP 400 `content_policy_violation`).

The orchestrator builds it from a CheckResponse with `refusal_status(...)` and aborts with it; the CLI reads
it back with `parse_refusal(rpc_error)` (exit code 3). It carries the stage that refused and the categories,
never scores and never the blocklist's text. Only grpc and googleapis protos are imported here, so any process
can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

REASON = "CONTENT_POLICY_VIOLATION"
DOMAIN = "unclip.safety"
# The public names of the stages (safety.proto CheckStage).
STAGE_NAMES = {1: "prompt", 2: "input_image", 3: "decoder_output", 4: "final_output"}


@dataclass(frozen=True)
class Refusal:
    stage: str  # "prompt" | "input_image" | "decoder_output" | "final_output"
    categories: list[str]
    policy_version: str
    message: str


def refusal_message(stage: str, categories: list[str]) -> str:
    what = {"prompt": "the prompt", "input_image": "the input image"}.get(stage, "the generated images")
    listed = ", ".join(categories) if categories else "unspecified"
    return f"content_policy_violation: {what} was refused by the content policy ({stage}: {listed})"


def refusal_status(stage: str | int, categories: list[str], policy_version: str = "") -> grpc.Status:
    """The status to abort with: `context.abort_with_status(refusal_status("prompt", ["violence"]))`.

    `stage` is a stage name or a safety_pb2.CheckStage value."""
    if isinstance(stage, int):
        stage = STAGE_NAMES.get(stage, "unspecified")
    categories = sorted(set(categories))
    info = error_details_pb2.ErrorInfo(
        reason=REASON,
        domain=DOMAIN,
        metadata={"stage": stage, "categories": ",".join(categories), "policy_version": policy_version},
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=refusal_message(stage, categories))
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


def parse_refusal(error: grpc.RpcError) -> Refusal | None:
    """The refusal inside an RpcError, or None when the error is something else."""
    if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.reason == REASON:
                categories = [c for c in info.metadata.get("categories", "").split(",") if c]
                return Refusal(
                    info.metadata.get("stage", ""), categories, info.metadata.get("policy_version", ""),
                    status.message,
                )  # fmt: skip
    return None
