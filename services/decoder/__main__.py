"""python -m services.decoder --model DIR --port N [--stage decoder|super_res|super_res_2].

The decoder (text_proj + UNet) and every super-resolution stage run from this one code, one process per stage,
so a deployment scales each on its own.
"""

from __future__ import annotations

import argparse
import sys

from services.decoder.servicer import DEFAULT_STEPS, DecoderServicer, UpsamplerServicer
from unclip.runtime import settings
from unclip.runtime.server import BATCHING_SETTINGS, SERVER_SETTINGS, batcher_config, configure_logging, serve
from unclip.runtime.telemetry import instrument_process
from unclip.runtime.threads import policy_from_setting
from unclip.v1 import decoder_pb2, decoder_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.decoder", description=__doc__)
    settings.add_arguments(
        parser, ["model", "stage", "device", "dtype", "torch_threads", *BATCHING_SETTINGS, *SERVER_SETTINGS]
    )
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or UNCLIP_MODEL) is required")
    if args.stage not in DEFAULT_STEPS:
        parser.error(f"--stage must be one of {', '.join(DEFAULT_STEPS)}, got {args.stage!r}")
    if args.port is None:
        args.port = settings.DEFAULT_PORTS[args.stage]
    configure_logging(args.stage)
    threads = policy_from_setting(args.torch_threads)
    threads.apply()
    service_metrics, interceptors = instrument_process(
        args.stage, args.metrics_port, args.metrics_host or args.host
    )
    config = batcher_config(args)

    if args.stage == "decoder":
        servicer = DecoderServicer(args.stage, str(args.model), service_metrics, config)
        service = "Decoder"

        def register(server) -> None:
            decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    else:
        servicer = UpsamplerServicer(args.stage, str(args.model), service_metrics, config)
        service = "Upsampler"

        def register(server) -> None:
            decoder_pb2_grpc.add_UpsamplerServicer_to_server(servicer, server)

    def load() -> None:
        from services.decoder.engine import DecoderEngine, UpsamplerEngine

        with service_metrics.model_load():
            if args.stage == "decoder":
                engine = DecoderEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
            else:
                engine = UpsamplerEngine.from_pretrained(
                    args.model, stage=args.stage, device=args.device, dtype=args.dtype
                )
            if hasattr(engine, "warmup"):
                engine.warmup()
        servicer.slot.attach(engine, threads=threads)

    return serve(
        args.stage,
        args,
        register=register,
        service_names=[decoder_pb2.DESCRIPTOR.services_by_name[service].full_name],
        load=load,
        interceptors=interceptors,
    )


if __name__ == "__main__":
    sys.exit(main())
