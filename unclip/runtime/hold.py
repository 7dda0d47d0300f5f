"""The ``BatchHold`` service of a denoising stage: the orchestrator's stack-wide pause of batch-priority rows
(the rules are in ``unclip.batching.hold``). Registered by ``serve()`` on every stage server, behind the same
credentials as the stage's own methods (with mTLS: only the orchestrator's certificate may call)."""

from __future__ import annotations

import grpc

from unclip.batching.hold import STAGE_HOLD, HoldState
from unclip.runtime.errors import grpc_errors
from unclip.v1 import hold_pb2, hold_pb2_grpc

SERVICE_NAME = hold_pb2.DESCRIPTOR.services_by_name["BatchHold"].full_name


class BatchHoldServicer(hold_pb2_grpc.BatchHoldServicer):
    def __init__(self, state: HoldState = STAGE_HOLD) -> None:
        self.state = state

    @grpc_errors
    def Hold(self, request: hold_pb2.HoldRequest, context: grpc.ServicerContext) -> hold_pb2.HoldReply:
        held = self.state.set(request.holder, request.sequence, request.seconds)
        return hold_pb2.HoldReply(held=held)


def register(server: grpc.Server) -> None:
    hold_pb2_grpc.add_BatchHoldServicer_to_server(BatchHoldServicer(), server)
