"""python -m services.safety --port 50057 [--policy FILE] [--audit-dir DIR]: the moderation stage.

Wiring only: the policy (reloaded when the file changes or on SIGHUP), the audit log, the servicer, the shared
server.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path

from services.safety.audit import AuditLog
from services.safety.engine import SafetyEngine
from services.safety.servicer import SafetyServicer
from unclip.runtime.server import SERVER_SETTINGS, configure_logging, serve
from unclip.runtime.settings import DEFAULT_PORTS, add_arguments, env_default
from unclip.runtime.telemetry import instrument_process
from unclip.runtime.threads import policy_from_setting
from unclip.v1 import safety_pb2, safety_pb2_grpc

log = logging.getLogger("services.safety")
DEFAULT_POLICY = str(Path(__file__).resolve().parents[2] / "policies" / "default.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.safety", description=__doc__.splitlines()[0])
    # encoder_addr: where filters that embed text or images (clip_concepts) reach the encoder, unless the
    # policy names an encoder_addr itself.
    add_arguments(parser, [*SERVER_SETTINGS, "torch_threads", "encoder_addr"], port=DEFAULT_PORTS["safety"])
    parser.add_argument(
        "--policy",
        default=env_default("safety_policy") or DEFAULT_POLICY,
        help="moderation policy file (YAML) [env UNCLIP_SAFETY_POLICY, default policies/default.yaml]",
    )
    add_arguments(parser, ["audit_dir", "audit_segment_bytes", "audit_ship", "policy_poll_seconds"])
    return parser.parse_args(argv)


def _ship_hook(spec: str):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("safety")
    policy_from_setting(args.torch_threads).apply()  # model-backed filters share the machine
    # Traces (one per request, across every stage) and the metrics endpoint, as every service has them.
    service_metrics, interceptors = instrument_process(
        "safety", args.metrics_port, args.metrics_host or args.host
    )
    servicer = SafetyServicer(service_metrics)
    holder: dict[str, SafetyEngine] = {}

    def register(server) -> None:
        safety_pb2_grpc.add_SafetyServicer_to_server(servicer, server)

    def load() -> None:
        audit = AuditLog(
            args.audit_dir,
            max_segment_bytes=args.audit_segment_bytes,
            on_segment_closed=_ship_hook(args.audit_ship),
        )
        engine = SafetyEngine(args.policy, audit, encoder_addr=args.encoder_addr)
        engine.load()
        holder["engine"] = engine
        servicer.engine = engine
        if args.policy_poll_seconds > 0:
            engine.watch(args.policy_poll_seconds)
        log.info("policy %s from %s; audit log in %s", engine.policy.version, args.policy, args.audit_dir)

    def on_sighup(_signum: int, _frame: object) -> None:
        engine = holder.get("engine")
        if engine is not None:  # reload off the signal handler: it may load models
            threading.Thread(target=engine.reload, kwargs={"force": True}, name="policy-sighup").start()

    signal.signal(signal.SIGHUP, on_sighup)
    name = safety_pb2.DESCRIPTOR.services_by_name["Safety"].full_name
    status = serve(
        "safety", args, register=register, service_names=[name], load=load, interceptors=interceptors
    )
    engine = holder.get("engine")
    if engine is not None:
        engine.close()
        if engine.audit is not None:
            engine.audit.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
