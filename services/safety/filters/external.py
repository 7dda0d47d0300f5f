"""External filter: any gRPC service implementing the Safety contract (protos/unclip/v1/safety.proto).

Policy entry:
    vendor:
      type: external
      address: 10.0.0.7:7000       # host:port or dns:///name:port
      timeout_seconds: 2.0         # per call (also bounded by the caller's deadline)
      fail_open: false             # default: when it is unreachable or times out, the request is refused

The external service gets the same request the safety service got. Each category of a verdict that is not
ALLOW scores 1.0; the policy's action for that category applies, and a category the policy does not list takes
the external service's own action. A verdict without categories counts in a category named after the filter.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np

from services.safety.filters.base import CheckInput, Filter, FilterError, Score, SpecError
from unclip.v1 import safety_pb2, safety_pb2_grpc, tensor_pb2

_STAGES = {
    "input_image": safety_pb2.CHECK_STAGE_INPUT_IMAGE,
    "decoder_output": safety_pb2.CHECK_STAGE_DECODER_OUTPUT,
    "final_output": safety_pb2.CHECK_STAGE_FINAL_OUTPUT,
}
_ACTIONS = {
    safety_pb2.ACTION_FLAG: "flag",
    safety_pb2.ACTION_WITHHOLD: "withhold",
    safety_pb2.ACTION_BLOCK: "block",
}


class ExternalFilter(Filter):
    type = "external"
    accepts = frozenset({"text", "images"})
    spec_keys = frozenset({"address", "timeout_seconds"})

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        super().__init__(name, spec, policy_dir)
        address = spec.get("address")
        if not isinstance(address, str) or not address:
            raise SpecError("address", "an external filter needs `address: host:port`")
        timeout = spec.get("timeout_seconds", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise SpecError("timeout_seconds", "must be a positive number")
        self.address = address
        self.timeout = float(timeout)
        limit = 256 * 1024 * 1024
        self._channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )
        self._stub = safety_pb2_grpc.SafetyStub(self._channel)

    def check(self, item: CheckInput) -> list[list[Score]]:
        timeout = self.timeout
        if item.deadline is not None:
            timeout = max(0.001, min(timeout, item.deadline - time.monotonic()))
        context = safety_pb2.RequestContext(**item.context)
        try:
            if item.prompt is not None:
                reply = self._stub.CheckPrompt(
                    safety_pb2.CheckPromptRequest(prompt=item.prompt, context=context), timeout=timeout
                )
            else:
                request = safety_pb2.CheckImagesRequest(
                    images=_tensor(item.images), stage=_STAGES[item.stage], context=context
                )
                if item.image_embeds is not None:
                    request.image_embeds.CopyFrom(_tensor(item.image_embeds))
                reply = self._stub.CheckImages(request, timeout=timeout)
        except grpc.RpcError as error:
            raise FilterError(f"{self.address}: {error.code().name}: {error.details()}") from error

        results: list[list[Score]] = [[] for _ in range(item.count)]
        for verdict in reply.verdicts:
            if not 0 <= verdict.index < item.count:
                raise FilterError(f"{self.address} answered for image {verdict.index} of {item.count}")
            action = _ACTIONS.get(verdict.action)
            if action is None:
                continue
            for category in list(verdict.categories) or [self.name]:
                results[verdict.index].append(Score(category, 1.0, None, f"external:{action}", action))
        return results

    def close(self) -> None:
        self._channel.close()


def _tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=list(array.shape), data=array.tobytes()
    )
