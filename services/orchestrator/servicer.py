"""ImageService servicer: the public API. Validation and the chain live in pipeline.py; this maps errors."""

from __future__ import annotations

import grpc

from services.orchestrator.clients import Calls
from services.orchestrator.pipeline import Pipeline
from unclip.runtime.errors import StatusError, grpc_errors
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc


class ImageServicer(orchestrator_pb2_grpc.ImageServiceServicer):
    def __init__(self, stage_timeout_seconds: float) -> None:
        self.pipeline: Pipeline | None = None  # set by __main__ once every stage is SERVING
        self.stage_timeout_seconds = stage_timeout_seconds

    def _run(self, context: grpc.ServicerContext) -> tuple[Pipeline, Calls]:
        if self.pipeline is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the orchestrator is waiting for its stages")
        return self.pipeline, Calls(context, self.stage_timeout_seconds)

    @grpc_errors
    def Generate(self, request: orchestrator_pb2.GenerateRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context)
        return pipeline.generate(request, calls)

    @grpc_errors
    def CreateVariation(self, request: orchestrator_pb2.VariationRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context)
        return pipeline.create_variation(request, calls)

    @grpc_errors
    def Edit(self, request: orchestrator_pb2.EditRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context)
        return pipeline.edit(request, calls)

    @grpc_errors
    def GetCapabilities(self, request: orchestrator_pb2.CapabilitiesRequest, context: grpc.ServicerContext):
        pipeline, _ = self._run(context)
        return pipeline.capabilities()
