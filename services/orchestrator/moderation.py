"""The content policy's checkpoints in a request: the prompt, uploaded images, and the images each stage
makes (BLOCK refuses the request, WITHHOLD drops one image). Each is one call to the safety stage, carrying
the request's identity for its audit log."""

from __future__ import annotations

import grpc
import torch

from services.orchestrator.clients import Calls, Replicas
from services.orchestrator.params import Request
from services.safety.refusal import refusal_status
from unclip.runtime.errors import StatusError
from unclip.runtime.tensors import from_proto, to_proto
from unclip.v1 import safety_pb2, tensor_pb2


class ContentChecks:
    """The safety stage's checks, as a request's pipeline calls them."""

    def __init__(self, safety: Replicas):
        self.safety = safety  # the safety stage (any replica)

    def context(self, r: Request) -> safety_pb2.RequestContext:
        return safety_pb2.RequestContext(
            request_id=r.request_id, user=r.user, identity=r.identity, tenant=r.tenant
        )

    def check_prompt(self, prompt: str, r: Request, calls: Calls) -> None:
        verdict = calls(
            self.safety.CheckPrompt,
            safety_pb2.CheckPromptRequest(prompt=prompt, context=self.context(r)),
            "safety",
        )
        if verdict.action in (safety_pb2.ACTION_BLOCK, safety_pb2.ACTION_WITHHOLD):
            raise refused(safety_pb2.CHECK_STAGE_PROMPT, _categories(verdict), verdict)

    def check_images(self, images: torch.Tensor, stage: int, r: Request, calls: Calls) -> None:
        verdict = calls(
            self.safety.CheckImages,
            safety_pb2.CheckImagesRequest(images=to_proto(images), stage=stage, context=self.context(r)),
            "safety",
        )
        if verdict.action in (safety_pb2.ACTION_BLOCK, safety_pb2.ACTION_WITHHOLD):
            raise refused(stage, _categories(verdict), verdict)

    def filter_images(
        self,
        images: tensor_pb2.Tensor,
        generators: list[tensor_pb2.GeneratorState],
        indices: list[int],
        stage: int,
        r: Request,
        calls: Calls,
    ) -> tuple[tensor_pb2.Tensor, list[tensor_pb2.GeneratorState], list[int], list[str]]:
        """Checks images (row k is image indices[k]); BLOCK refuses the request, WITHHOLD drops that image.

        Returns the images, generators and indices left, and the categories of those dropped.
        """
        verdict = calls(
            self.safety.CheckImages,
            safety_pb2.CheckImagesRequest(images=images, stage=stage, context=self.context(r)),
            "safety",
        )
        if verdict.action == safety_pb2.ACTION_BLOCK:
            raise refused(stage, _categories(verdict), verdict)
        dropped = {
            v.index
            for v in verdict.verdicts
            if v.action in (safety_pb2.ACTION_WITHHOLD, safety_pb2.ACTION_BLOCK)
        }
        if not dropped:
            return images, generators, indices, []
        categories = [c for v in verdict.verdicts if v.index in dropped for c in v.categories]
        if len(dropped) >= len(indices):
            raise refused(stage, categories, verdict)  # every image withheld
        rows = [row for row in range(len(indices)) if row not in dropped]
        kept_generators = [generators[row] for row in rows] if generators else generators
        return select_rows(images, rows), kept_generators, [indices[row] for row in rows], categories


def refused(stage: int, categories: list[str], verdict: safety_pb2.CheckResponse) -> StatusError:
    """A refusal by the content policy: INVALID_ARGUMENT with an ErrorInfo CONTENT_POLICY_VIOLATION (the CLI
    exits 3)."""
    status = refusal_status(stage, categories, verdict.policy_version)
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, status.details, status)


def _categories(verdict: safety_pb2.CheckResponse) -> list[str]:
    return sorted({c for v in verdict.verdicts for c in v.categories})


def select_rows(tensor: tensor_pb2.Tensor, rows: list[int]) -> tensor_pb2.Tensor:
    """The given rows of a tensor (first dimension)."""
    return to_proto(from_proto(tensor, "images")[rows])
