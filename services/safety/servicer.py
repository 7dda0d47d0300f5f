"""Safety gRPC servicer: proto <-> CheckInput / Decision, and error mapping. The engine does the deciding."""

from __future__ import annotations

import time

import grpc
import torch

from services.safety.audit import AuditError
from services.safety.engine import Decision, SafetyEngine
from services.safety.filters.base import CheckInput
from unclip.access.interceptor import current_identity
from unclip.limits import LIMITS, check_chars
from unclip.runtime.errors import StatusError, grpc_errors
from unclip.runtime.tensors import from_field
from unclip.v1 import safety_pb2, safety_pb2_grpc

MAX_PROMPT_CHARS = int(LIMITS["prompt_chars"].high)  # the public API's limit (unclip.limits)
MAX_IMAGES = int(LIMITS["n"].high)
_STAGES = {
    safety_pb2.CHECK_STAGE_INPUT_IMAGE: "input_image",
    safety_pb2.CHECK_STAGE_DECODER_OUTPUT: "decoder_output",
    safety_pb2.CHECK_STAGE_FINAL_OUTPUT: "final_output",
}
_ACTIONS = {
    "allow": safety_pb2.ACTION_ALLOW,
    "flag": safety_pb2.ACTION_FLAG,
    "withhold": safety_pb2.ACTION_WITHHOLD,
    "block": safety_pb2.ACTION_BLOCK,
}


class SafetyServicer(safety_pb2_grpc.SafetyServicer):
    def __init__(self, metrics=None) -> None:
        self.engine: SafetyEngine | None = None  # set once the policy is loaded (UNAVAILABLE until then)
        self.metrics = metrics  # ServiceMetrics: each check's seconds go to the busy-seconds counter

    def _engine(self) -> SafetyEngine:
        if self.engine is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the safety service is still loading its policy")
        return self.engine

    @grpc_errors
    def CheckPrompt(self, request: safety_pb2.CheckPromptRequest, context: grpc.ServicerContext):
        engine = self._engine()
        if not request.prompt:
            raise ValueError("prompt is required")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(request.prompt)}"
            )
        item = CheckInput(
            "prompt", prompt=request.prompt, context=_context(request), deadline=_deadline(context)
        )
        return self._timed(engine, item)

    @grpc_errors
    def CheckImages(self, request: safety_pb2.CheckImagesRequest, context: grpc.ServicerContext):
        engine = self._engine()
        if request.stage not in _STAGES:
            raise ValueError(
                "stage must be CHECK_STAGE_INPUT_IMAGE, CHECK_STAGE_DECODER_OUTPUT or "
                "CHECK_STAGE_FINAL_OUTPUT, "
                f"got {safety_pb2.CheckStage.Name(request.stage) if request.stage in safety_pb2.CheckStage.values() else request.stage}"  # noqa: E501
            )
        images = from_field(request, "images", dtype=torch.float32, shape=[None, 3, None, None], finite=True)
        n, _, height, width = images.shape
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"images must hold 1..{MAX_IMAGES} images, got {n}")
        if height != width or height < 1:
            raise ValueError(f"images must be square, got {height}x{width}")
        if height > LIMITS["image_side"].high:
            raise ValueError(f"images are {height}x{width}, over {LIMITS['image_side'].high} pixels a side")
        embeds = None
        if request.HasField("image_embeds"):
            embeds = from_field(
                request, "image_embeds", dtype=torch.float32, shape=[n, None], finite=True
            ).numpy()
        item = CheckInput(
            _STAGES[request.stage],
            images=images.numpy(),
            image_embeds=embeds,
            context=_context(request),
            deadline=_deadline(context),
        )
        return self._timed(engine, item)

    def _timed(self, engine: SafetyEngine, item: CheckInput) -> safety_pb2.CheckResponse:
        """The check's answer with the seconds it took (usage accounting; the busy-seconds counter)."""
        began = time.perf_counter()
        response = _response(_decide(engine, item))
        response.compute_seconds = time.perf_counter() - began
        if self.metrics is not None:
            self.metrics.busy(response.compute_seconds)
        return response


def _decide(engine: SafetyEngine, item: CheckInput) -> Decision:
    try:
        return engine.check(item)
    except AuditError as error:  # an unrecorded decision must not go out: the caller fails closed
        raise StatusError(grpc.StatusCode.UNAVAILABLE, f"audit log unavailable: {error}") from error


def _context(request) -> dict[str, str]:
    """The request's context for the audit, each string bounded (unclip.limits "context_chars"). Identity and
    tenant are taken as given only from a caller that authenticated as a service allowed to call (mTLS,
    unclip.access.interceptor.StageGuard: the orchestrator); without mTLS they are recorded as
    "unverified:..." so a forged one never reads as real."""
    c = request.context
    for name in ("request_id", "user", "identity", "tenant"):
        check_chars("context_chars", getattr(c, name), f"context.{name}")
    identity, tenant = c.identity, c.tenant
    if current_identity().kind != "service":
        identity = f"unverified:{identity}" if identity else ""
        tenant = f"unverified:{tenant}" if tenant else ""
    return {"request_id": c.request_id, "user": c.user, "identity": identity, "tenant": tenant}


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _response(decision: Decision) -> safety_pb2.CheckResponse:
    return safety_pb2.CheckResponse(
        action=_ACTIONS[decision.action],
        verdicts=[
            safety_pb2.Verdict(index=v.index, action=_ACTIONS[v.action], categories=v.categories)
            for v in decision.verdicts
        ],
        policy_version=decision.policy_version,
    )
