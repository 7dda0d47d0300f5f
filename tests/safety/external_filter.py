"""A stand-in third-party filter: its own gRPC server implementing the Safety contract (unclip.v1.Safety).

    python tests/safety/external_filter.py --port 0 --word pineapple --category fruit --action block

Prompts containing --word get --action in --category; images whose mean pixel is above --bright get --action
in category "bright". A test can also steer it through the request's `user` field, which the orchestrator
passes on: "withhold:decoder_output=2;final_output=1" withholds those positions of the batch at those stages
(category "vendor_nsfw"), "block:final_output" blocks the whole batch there. Every image check is printed
("check stage=... n=..."), so a test can see which images reached which check. It shares no code with
services.safety: only the proto contract.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from unclip.v1 import safety_pb2, safety_pb2_grpc  # noqa: E402

ACTIONS = {
    "flag": safety_pb2.ACTION_FLAG,
    "withhold": safety_pb2.ACTION_WITHHOLD,
    "block": safety_pb2.ACTION_BLOCK,
}


class Filter(safety_pb2_grpc.SafetyServicer):
    def __init__(self, args: argparse.Namespace):
        self.args = args

    def CheckPrompt(self, request, context):
        hit = self.args.word in request.prompt.lower()
        action = ACTIONS[self.args.action] if hit else safety_pb2.ACTION_ALLOW
        verdict = safety_pb2.Verdict(index=0, action=action, categories=[self.args.category] if hit else [])
        return safety_pb2.CheckResponse(action=action, verdicts=[verdict], policy_version="external-1")

    def CheckImages(self, request, context):
        images = np.frombuffer(request.images.data, np.float32).reshape(list(request.images.shape))
        stage = safety_pb2.CheckStage.Name(request.stage).removeprefix("CHECK_STAGE_").lower()
        user = request.context.user
        print(f"check stage={stage} n={len(images)} user={user}", flush=True)
        steer = _steering(user, stage)
        verdicts = []
        for i, image in enumerate(images):
            if steer is not None:
                action = steer(i)
                categories = ["vendor_nsfw"] if action != safety_pb2.ACTION_ALLOW else []
                verdicts.append(safety_pb2.Verdict(index=i, action=action, categories=categories))
                continue
            hit = float(image.mean()) > self.args.bright
            action = ACTIONS[self.args.action] if hit else safety_pb2.ACTION_ALLOW
            verdicts.append(safety_pb2.Verdict(index=i, action=action, categories=["bright"] if hit else []))
        overall = max((v.action for v in verdicts), default=safety_pb2.ACTION_ALLOW)
        return safety_pb2.CheckResponse(action=overall, verdicts=verdicts, policy_version="external-1")


def _steering(user: str, stage: str):
    """The per-position action the `user` field asks for at `stage`, or None."""
    kind, _, spec = user.partition(":")
    if kind == "block" and stage in spec.split(";"):
        return lambda i: safety_pb2.ACTION_BLOCK
    if kind == "withhold":
        for part in spec.split(";"):
            name, _, positions = part.partition("=")
            if name == stage:
                chosen = {int(p) for p in positions.split(",") if p}
                return lambda i: safety_pb2.ACTION_WITHHOLD if i in chosen else safety_pb2.ACTION_ALLOW
        return lambda i: safety_pb2.ACTION_ALLOW
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--word", default="pineapple")
    parser.add_argument("--category", default="fruit")
    parser.add_argument("--action", default="block", choices=sorted(ACTIONS))
    parser.add_argument("--bright", type=float, default=0.5)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    safety_pb2_grpc.add_SafetyServicer_to_server(Filter(args), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"external filter listening on 127.0.0.1:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    server.stop(2).wait()


if __name__ == "__main__":
    main()
