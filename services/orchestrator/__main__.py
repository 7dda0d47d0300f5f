"""python -m services.orchestrator --port N: the public API, chaining the stages (their addresses from
flags/env).

It holds no model. It says SERVING once every stage it chains says SERVING and the cascade's sizes are known;
afterwards its readiness (health service unclip.v1.ImageService) says NOT_SERVING while a stage has no SERVING
replica, and SERVING again once it has (checked every --stage-health-period-seconds).
"""

from __future__ import annotations

import argparse
import logging
import sys

from services.orchestrator.clients import Stages
from services.orchestrator.outputs import ImageStore
from services.orchestrator.params import StepDefaults
from services.orchestrator.pipeline import Pipeline
from services.orchestrator.servicer import ImageServicer
from unclip.access.interceptor import FrontDoor, tenant_label
from unclip.access.keys import KeyStore
from unclip.access.quotas import Quotas
from unclip.access.usage import Accounting, UsageLedger
from unclip.checks import check_guidance
from unclip.provenance.stamp import PROVENANCE_SETTINGS, Provenance
from unclip.runtime import settings
from unclip.runtime.server import SERVER_SETTINGS, configure_logging, serve
from unclip.runtime.telemetry import instrument_process
from unclip.storage import StorageError
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from unclip.vocabulary import load as load_vocabulary

# How long to wait at start for the stages to say SERVING before giving up.
STAGES_START_TIMEOUT_SECONDS = 600.0

# The deployment's steps and samplers for unset request fields (services.orchestrator.pipeline.StepDefaults).
STEP_DEFAULT_SETTINGS = [
    "prior_steps",
    "decoder_steps",
    "super_res_steps",
    "prior_sampler",
    "decoder_sampler",
    "super_res_sampler",
    "ddim_eta",
]

log = logging.getLogger("orchestrator")

ADDRESS_SETTINGS = ["encoder_addr", "prior_addr", "decoder_addr", "upsampler_addrs", "safety_addr"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.orchestrator", description=__doc__)
    settings.add_arguments(
        parser,
        [
            *ADDRESS_SETTINGS,
            "stage_timeout_seconds",
            "stage_health_period_seconds",
            "prior_guidance_scale",
            "decoder_guidance_scale",
            "edit_decoder_guidance_scale",
            *STEP_DEFAULT_SETTINGS,
            "max_inflight",
            "max_inflight_per_caller",
            "images_url",
            "model_name",
            "vocabulary",
            *PROVENANCE_SETTINGS,
            "keys_file",
            "max_request_compute",
            "usage_dir",
            "device_watts",
            *SERVER_SETTINGS,
        ],
        port=settings.DEFAULT_PORTS["orchestrator"],
    )
    args = parser.parse_args(argv)
    configure_logging("orchestrator")
    service_metrics, interceptors = instrument_process(
        "orchestrator", args.metrics_port, args.metrics_host or args.host
    )
    upsamplers = [a.strip() for a in args.upsampler_addrs.split(",") if a.strip()]
    try:  # the deployment's default is checked like a request's value, before anything starts
        check_guidance(args.prior_guidance_scale, "--prior-guidance-scale")
        check_guidance(args.decoder_guidance_scale, "--decoder-guidance-scale")
        check_guidance(args.edit_decoder_guidance_scale, "--edit-decoder-guidance-scale")
        step_defaults = StepDefaults(
            prior_num_inference_steps=args.prior_steps,
            decoder_num_inference_steps=args.decoder_steps,
            super_res_num_inference_steps=args.super_res_steps,
            prior_sampler=args.prior_sampler,
            decoder_sampler=args.decoder_sampler,
            super_res_sampler=args.super_res_sampler,
            ddim_eta=args.ddim_eta,
        ).check()
    except ValueError as error:
        parser.error(str(error))
    if args.max_inflight < 1 or args.max_inflight_per_caller < 1:
        parser.error("--max-inflight and --max-inflight-per-caller must be at least 1")
    # Threads for every admitted request, plus room to refuse the excess at once rather than queue it.
    args.max_workers = max(args.max_workers, 2 * args.max_inflight + 8)
    try:  # a bad bucket URL or missing S3 endpoint stops the start, not the first URL request
        image_store = ImageStore.from_settings(args.images_url)
    except (ValueError, StorageError) as error:
        parser.error(str(error))
    try:  # a vocabulary that cannot be read stops the start, not a request
        vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
    except OSError as error:
        parser.error(f"--vocabulary: cannot read {args.vocabulary}: {error.strerror}")
    try:  # a signer or watermark key that cannot be used stops the start, naming the setting
        provenance = Provenance.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    store = key_store(args)
    servicer = ImageServicer(
        args.stage_timeout_seconds,
        args.max_inflight,
        args.max_inflight_per_caller,
        quotas=Quotas(store.tenant_limits) if store else None,
        max_request_compute=args.max_request_compute,
        accounting=Accounting(
            UsageLedger(args.usage_dir) if args.usage_dir else None,
            args.device_watts,
            (lambda tenant: tenant_label(tenant, store.tenant_names())) if store else (lambda tenant: tenant),
        ),
    )
    if store is not None:
        interceptors = [*interceptors, FrontDoor(store)]
    servicer.verifier = provenance.verifier()
    connected: list[Stages] = []

    def load() -> None:
        stages = Stages.connect(
            encoder=args.encoder_addr,
            prior=args.prior_addr,
            decoder=args.decoder_addr,
            upsamplers=upsamplers,
            safety=args.safety_addr,
            max_message_bytes=args.max_message_bytes,
            metrics=service_metrics,
        )
        stages.wait_until_serving(STAGES_START_TIMEOUT_SECONDS)
        connected.append(stages)
        servicer.pipeline = Pipeline(
            stages,
            stages.cascade(),
            args.stage_timeout_seconds,
            image_store,
            prior_guidance_scale=args.prior_guidance_scale,
            decoder_guidance_scale=args.decoder_guidance_scale,
            edit_decoder_guidance_scale=args.edit_decoder_guidance_scale,
            step_defaults=step_defaults,
            model_name=args.model_name,
            vocabulary=vocabulary,
            provenance=provenance,
        )

    return serve(
        "orchestrator",
        args,
        register=lambda server: orchestrator_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server),
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name],
        load=load,
        interceptors=interceptors,
        readiness=lambda: every_stage_serving(connected[0]),
        readiness_period_s=args.stage_health_period_seconds,
        front_door=True,
    )


def key_store(args: argparse.Namespace) -> KeyStore | None:
    """The keys file of --keys-file; None (and a warning: authentication is off) without one."""
    if not args.keys_file:
        log.warning("authentication is OFF (no --keys-file / UNCLIP_KEYS_FILE): every caller is anonymous")
        return None
    try:
        store = KeyStore(args.keys_file)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--keys-file: {error}") from error
    log.info("authentication on: keys file %s", args.keys_file)
    return store


def every_stage_serving(stages: Stages) -> bool:
    """Ready while every stage has at least one SERVING replica (a request needs all of them)."""
    return all(
        replicas.serving()
        for replicas in [stages.encoder, stages.prior, stages.decoder, *stages.upsamplers, stages.safety]
    )


if __name__ == "__main__":
    sys.exit(main())
