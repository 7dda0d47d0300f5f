"""python -m services.prior --model DIR --port N: the diffusion prior stage."""

from __future__ import annotations

import argparse
import sys

from services.prior.servicer import PriorServicer
from unclip.runtime import settings
from unclip.runtime.server import BATCHING_SETTINGS, SERVER_SETTINGS, batcher_config, configure_logging, serve
from unclip.runtime.telemetry import instrument_process
from unclip.runtime.threads import policy_from_setting
from unclip.v1 import prior_pb2, prior_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.prior", description=__doc__)
    settings.add_arguments(
        parser,
        ["model", "device", "dtype", "torch_threads", *BATCHING_SETTINGS, *SERVER_SETTINGS],
        port=settings.DEFAULT_PORTS["prior"],
    )
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or UNCLIP_MODEL) is required")
    configure_logging("prior")
    threads = policy_from_setting(args.torch_threads)
    threads.apply()
    service_metrics, interceptors = instrument_process(
        "prior", args.metrics_port, args.metrics_host or args.host
    )
    servicer = PriorServicer(service_metrics, batcher_config(args))

    def load() -> None:
        from services.prior.engine import PriorEngine

        with service_metrics.model_load():
            engine = PriorEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
            if hasattr(engine, "warmup"):
                engine.warmup()
        servicer.slot.attach(engine, threads=threads)

    return serve(
        "prior",
        args,
        register=lambda server: prior_pb2_grpc.add_PriorServicer_to_server(servicer, server),
        service_names=[prior_pb2.DESCRIPTOR.services_by_name["Prior"].full_name],
        load=load,
        interceptors=interceptors,
    )


if __name__ == "__main__":
    sys.exit(main())
