"""python -m services.encoder --model DIR --port N: the CLIP text (and image) encoder stage."""

from __future__ import annotations

import argparse
import sys

from services.encoder.servicer import EncoderServicer
from unclip.runtime import settings
from unclip.runtime.server import BATCHING_SETTINGS, SERVER_SETTINGS, batcher_config, configure_logging, serve
from unclip.runtime.telemetry import instrument_process
from unclip.runtime.threads import policy_from_setting
from unclip.v1 import encoder_pb2, encoder_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.encoder", description=__doc__)
    settings.add_arguments(
        parser,
        ["model", "device", "dtype", "torch_threads", *BATCHING_SETTINGS, *SERVER_SETTINGS],
        port=settings.DEFAULT_PORTS["encoder"],
    )
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or UNCLIP_MODEL) is required")
    configure_logging("encoder")
    threads = policy_from_setting(args.torch_threads)
    threads.apply()
    service_metrics, interceptors = instrument_process(
        "encoder", args.metrics_port, args.metrics_host or args.host
    )
    # Text requests are batched across callers (max_batch_size prompts, max_queue_delay_ms, max_queue_size;
    # deterministic turns it off), as the other model stages do at step level.
    servicer = EncoderServicer(service_metrics, batcher_config(args))

    def load() -> None:
        from services.encoder.engine import EncoderEngine

        with service_metrics.model_load():
            engine = EncoderEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
            if hasattr(engine, "warmup"):
                engine.warmup()
        servicer.attach(engine, threads)

    return serve(
        "encoder",
        args,
        register=lambda server: encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server),
        service_names=[encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name],
        load=load,
        interceptors=interceptors,
    )


if __name__ == "__main__":
    sys.exit(main())
