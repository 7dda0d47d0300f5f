"""The one registry of environment variables.

Every process of the stack reads its configuration here: a command-line flag wins, then the environment
variable, then the default. `python -m unclip.runtime.settings` prints the table (it is also in
docs/interfaces.md).

Message sizes: the largest message the stack carries is the orchestrator's answer (or an upsampler's request
with an edit) at n=10, 1024 x 1024: 10 * 3 * 1024 * 1024 * 4 bytes = 126 MB of float32 pixels, plus an inpaint
mask of 42 MB, plus the PNGs (at most ~3 MB each). 256 MiB covers the largest request with room to spare;
gRPC's default (4 MiB) would refuse any float image above ~590 px.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from unclip import limits

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Default ports of each process (docs/interfaces.md).
DEFAULT_PORTS = {
    "orchestrator": 50051,
    "encoder": 50052,
    "prior": 50053,
    "decoder": 50054,
    "super_res": 50055,
    "super_res_2": 50056,
    "safety": 50057,
    "gateway": 8080,  # HTTP (services.gateway)
}


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _float_or_none(value: str) -> float | None:
    return None if value in ("", "none") else float(value)


def _int_or_none(value: str) -> int | None:
    return None if value in ("", "none") else int(value)


class InvalidSetting(argparse.ArgumentTypeError, ValueError):
    """A bad value whose message argparse (flags) and env_default (variables) both show as is."""


# As unclip.models.DTYPES (kept import-free: no torch here); "auto" is resolved by unclip.models.parse_dtype.
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _dtype(value: str) -> str:
    if value not in DTYPES:
        raise InvalidSetting(f"UNCLIP_DTYPE / --dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str  # attribute name on the parsed namespace, and the flag (--name with - for _)
    env: str  # environment variable the flag falls back to
    default: Any  # value when neither flag nor variable is set
    type: Callable[[str], Any]  # parses the flag / variable text
    help: str  # one line, shown by --help and in the docs


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("model", "UNCLIP_MODEL", None, str, "model folder (Karlo layout) or s3://bucket/prefix"),
        Setting("host", "UNCLIP_HOST", "0.0.0.0", str, "address to listen on"),
        Setting("port", "UNCLIP_PORT", None, int, "port to listen on (0 picks a free one and prints it)"),
        Setting(
            "stage",
            "UNCLIP_STAGE",
            "decoder",
            str,
            "services.decoder stage: decoder, super_res or super_res_2",
        ),
        Setting("device", "UNCLIP_DEVICE", "cpu", str, "torch device of the model stages"),
        Setting(
            "dtype",
            "UNCLIP_DTYPE",
            "auto",
            _dtype,
            "model stages: weights' precision (auto, float32, float16, bfloat16; auto: bfloat16 on a CPU "
            "with native bfloat16 arithmetic, float16 on CUDA, else float32); wire tensors stay float32",
        ),
        Setting(
            "torch_threads",
            "UNCLIP_TORCH_THREADS",
            0,
            int,
            "model stages: torch threads; 0 = the stack's choice (the pod's CPU limit or the idle cores, "
            "per step; unclip.runtime.threads), N > 0 pins N (bit-reproducible across load)",
        ),
        # Compute options of the UNets, read by unclip.models when a stage loads (benchmarks/compute.py
        # measures each; BENCHMARKS.md "Caveats" has the numbers behind the defaults).
        Setting(
            "inference_mode",
            "UNCLIP_INFERENCE_MODE",
            True,
            _bool,
            "prior/decoder/upsamplers (variable only): steps run under torch.inference_mode (bit-exact)",
        ),
        Setting(
            "channels_last",
            "UNCLIP_CHANNELS_LAST",
            True,
            _bool,
            "decoder/upsamplers (read at load; `unclip up --[no-]channels-last`): channels-last UNets, "
            "10-16 % faster upsampler steps on CPU; within ~2e-4 of the contiguous layout, not bit-exact",
        ),
        Setting(
            "compile",
            "UNCLIP_COMPILE",
            False,
            _bool,
            "decoder/upsamplers (read at load; `unclip up --compile`): torch.compile the UNets (not "
            "bit-exact; minutes of compiling)",
        ),
        Setting(
            "max_message_bytes",
            "UNCLIP_MAX_MESSAGE_BYTES",
            DEFAULT_MAX_MESSAGE_BYTES,
            int,
            "max gRPC send/receive message size (n=10 float32 at 1024^2 needs ~170 MB)",
        ),
        Setting(
            "grace_seconds",
            "UNCLIP_GRACE_SECONDS",
            60.0,
            float,
            "on SIGTERM, time in-flight calls get to finish",
        ),
        Setting(
            "max_connection_age_seconds",
            "UNCLIP_MAX_CONNECTION_AGE_SECONDS",
            None,
            _float_or_none,
            "close client connections after this age so clients re-resolve replicas (unset: never)",
        ),
        Setting(
            "max_workers", "UNCLIP_MAX_WORKERS", 8, int, "concurrent calls a server runs (thread pool size)"
        ),
        Setting(
            "encoder_addr", "UNCLIP_ENCODER_ADDR", "127.0.0.1:50052", str, "orchestrator -> encoder target"
        ),
        Setting("prior_addr", "UNCLIP_PRIOR_ADDR", "127.0.0.1:50053", str, "orchestrator -> prior target"),
        Setting(
            "decoder_addr", "UNCLIP_DECODER_ADDR", "127.0.0.1:50054", str, "orchestrator -> decoder target"
        ),
        Setting(
            "upsampler_addrs",
            "UNCLIP_UPSAMPLER_ADDRS",
            "127.0.0.1:50055",
            str,
            "orchestrator -> upsampler targets, comma-separated, cascade order ('' for none)",
        ),
        Setting("safety_addr", "UNCLIP_SAFETY_ADDR", "127.0.0.1:50057", str, "orchestrator -> safety target"),
        Setting(
            "safety_policy", "UNCLIP_SAFETY_POLICY", None, str, "moderation policy file of the safety service"
        ),
        Setting("audit_dir", "UNCLIP_AUDIT_DIR", "runs/audit", str, "safety: directory of the audit log"),
        Setting(
            "audit_segment_bytes",
            "UNCLIP_AUDIT_SEGMENT_BYTES",
            64 * 1024 * 1024,
            int,
            "safety: rotate the audit segment after this many bytes",
        ),
        Setting(
            "audit_ship",
            "UNCLIP_AUDIT_SHIP",
            "",
            str,
            "safety: module:function called with each closed audit segment, off the request path "
            "(e.g. unclip.storage:ship_audit_segment)",
        ),
        Setting(
            "policy_poll_seconds",
            "UNCLIP_POLICY_POLL_SECONDS",
            1.0,
            float,
            "safety: how often the policy file is checked for changes (0: only on SIGHUP)",
        ),
        Setting(
            "prior_guidance_scale",
            "UNCLIP_PRIOR_GUIDANCE_SCALE",
            4.0,
            float,
            "orchestrator: prior guidance for requests that leave it unset (Karlo's 4.0; `unclip up` takes a "
            "model folder's sampling_defaults.json)",
        ),
        Setting(
            "decoder_guidance_scale",
            "UNCLIP_DECODER_GUIDANCE_SCALE",
            8.0,
            float,
            "orchestrator: decoder guidance for generations and variations that leave it unset (Karlo's 8.0; "
            "`unclip up` takes a model folder's sampling_defaults.json)",
        ),
        Setting(
            "edit_decoder_guidance_scale",
            "UNCLIP_EDIT_DECODER_GUIDANCE_SCALE",
            8.0,
            float,
            "orchestrator: decoder guidance for edits that leave it unset (Karlo's 8.0, as for generation; "
            "`unclip up` takes a model folder's sampling_defaults.json)",
        ),
        Setting(
            "stage_timeout_seconds",
            "UNCLIP_STAGE_TIMEOUT_SECONDS",
            600.0,
            float,
            "orchestrator: deadline of one stage call when the client set none",
        ),
        Setting(
            "stage_health_period_seconds",
            "UNCLIP_STAGE_HEALTH_PERIOD_SECONDS",
            5.0,
            float,
            "orchestrator: how often it checks that every stage has a SERVING replica; while one has none, "
            "its readiness (health service unclip.v1.ImageService) says NOT_SERVING; 0 turns the watch off",
        ),
        Setting(
            "max_batch_size",
            "UNCLIP_MAX_BATCH_SIZE",
            8,
            int,
            "images (prompts at the encoder) per forward pass; denoising stages batch at step level",
        ),
        Setting(
            "max_queue_delay_ms",
            "UNCLIP_MAX_QUEUE_DELAY_MS",
            2.0,
            float,
            "encoder: how long the oldest text request waits for others to share its forward pass",
        ),
        Setting(
            "idle_dispatch",
            "UNCLIP_IDLE_DISPATCH",
            True,
            _bool,
            "encoder: a text request on an idle encoder starts at once (requests arriving meanwhile form the "
            "next batch); false: the oldest waits max_queue_delay_ms for company, as Triton's batcher",
        ),
        Setting(
            "step_queue_delay_ms",
            "UNCLIP_STEP_QUEUE_DELAY_MS",
            0.0,
            float,
            "prior/decoder/upsamplers: how long an idle stage waits for company before its first step "
            "(0: at once; later arrivals join at the next step)",
        ),
        Setting(
            "max_queue_size",
            "UNCLIP_MAX_QUEUE_SIZE",
            16,
            int,
            "model stages: requests waiting for the engine; more are refused with RESOURCE_EXHAUSTED",
        ),
        Setting(
            "deterministic",
            "UNCLIP_DETERMINISTIC",
            False,
            _bool,
            "model stages: no cross-request batching, outputs bit-exact with one request alone",
        ),
        Setting(
            "max_inflight",
            "UNCLIP_MAX_INFLIGHT",
            16,
            int,
            "orchestrator: requests in progress; more are refused at once with RESOURCE_EXHAUSTED",
        ),
        Setting(
            "max_inflight_per_caller",
            "UNCLIP_MAX_INFLIGHT_PER_CALLER",
            4,
            int,
            "orchestrator: requests in progress per caller (its key or certificate, else its address)",
        ),
        Setting(
            "images_url",
            "UNCLIP_IMAGES_URL",
            "",
            str,
            "orchestrator: s3://bucket/prefix for OUTPUT_FORMAT_URL images ('' refuses such requests)",
        ),
        # Read by unclip.storage straight from the environment (any process that touches S3); listed here
        # so the table documents them. The credentials are the standard AWS_ACCESS_KEY_ID /
        # AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN.
        Setting(
            "s3_endpoint",
            "UNCLIP_S3_ENDPOINT",
            "",
            str,
            "S3 API the process talks to: host:port or http(s)://host:port",
        ),
        Setting(
            "s3_public_endpoint",
            "UNCLIP_S3_PUBLIC_ENDPOINT",
            "",
            str,
            "endpoint presigned URLs are signed for (SigV4 signs the Host); '': UNCLIP_S3_ENDPOINT",
        ),
        Setting("s3_region", "UNCLIP_S3_REGION", "us-east-1", str, "S3 region used for signing"),
        Setting(
            "model_cache",
            "UNCLIP_MODEL_CACHE",
            "",
            str,
            "local cache of s3:// models ('': $XDG_CACHE_HOME/unclip/models or ~/.cache/unclip/models)",
        ),
        Setting("addr", "UNCLIP_ADDR", "127.0.0.1:50051", str, "the CLI's orchestrator address"),
        Setting("metrics_port", "UNCLIP_METRICS_PORT", 9464, int, "Prometheus HTTP port (0 disables)"),
        # ---- access control: identities, keys, TLS, quotas, priorities, usage
        Setting(
            "keys_file",
            "UNCLIP_KEYS_FILE",
            "",
            str,
            "orchestrator: API keys / certificate clients (YAML or JSON, unclip.access.keys), reloaded on "
            "change; '' turns authentication OFF (logged); `unclip up` makes one",
        ),
        Setting("tls_cert", "UNCLIP_TLS_CERT", "", str, "PEM certificate this server serves ('': plaintext)"),
        Setting("tls_key", "UNCLIP_TLS_KEY", "", str, "PEM private key of --tls-cert"),
        Setting(
            "client_ca",
            "UNCLIP_CLIENT_CA",
            "",
            str,
            "PEM CA whose client certificates this server requires (mTLS; stages: only allowed callers)",
        ),
        Setting(
            "health_port",
            "UNCLIP_HEALTH_PORT",
            None,
            _int_or_none,
            "plaintext port serving only grpc.health.v1 (probes); 0 picks a free one; unset: none",
        ),
        Setting(
            "allowed_callers",
            "UNCLIP_ALLOWED_CALLERS",
            "",
            str,
            "stages with --client-ca: certificate CNs that may call, comma-separated ('': encoder: "
            "orchestrator,safety; others: orchestrator)",
        ),
        Setting("stage_tls_cert", "UNCLIP_STAGE_TLS_CERT", "", str, "client certificate presented to stages"),
        Setting("stage_tls_key", "UNCLIP_STAGE_TLS_KEY", "", str, "private key of --stage-tls-cert"),
        Setting(
            "stage_tls_ca",
            "UNCLIP_STAGE_TLS_CA",
            "",
            str,
            "CA that signed the stages' certificates ('': stage channels are plaintext)",
        ),
        Setting(
            "max_request_compute",
            "UNCLIP_MAX_REQUEST_COMPUTE",
            40000.0,
            float,
            "orchestrator: compute one request may ask for, in decoder-step equivalents (n x (prior steps x "
            "candidates + decoder steps + upsampler steps x size ratio^2)); more is INVALID_ARGUMENT; 0: any",
        ),
        Setting(
            "batch_max_hold_s",
            "UNCLIP_BATCH_MAX_HOLD_S",
            10.0,
            float,
            "priority: longest a batch request is held back for interactive work, at the orchestrator and "
            "again in each denoising stage (ageing: then it runs as interactive work does); 0: never held",
        ),
        Setting(
            "usage_dir",
            "UNCLIP_USAGE_DIR",
            "",
            str,
            "orchestrator: folder of the usage ledger (JSON lines per UTC day; `unclip usage`); '': none",
        ),
        Setting(
            "device_watts",
            "UNCLIP_DEVICE_WATTS",
            65.0,
            float,
            "orchestrator: estimated power (W) of a stage's device while computing (usage energy_joules)",
        ),
        Setting(
            "api_key",
            "UNCLIP_API_KEY",
            "",
            str,
            "the CLI's API key ('': the running `unclip up` stack's key, found through its state file)",
        ),
        #
        #
        # ---- input limits
        Setting(
            "reflection",
            "UNCLIP_REFLECTION",
            True,
            _bool,
            "serve gRPC server reflection (what `grpcurl list` reads); the production overlays turn it off",
        ),
        Setting(
            "malloc_tuning",
            "UNCLIP_MALLOC_TUNING",
            True,
            _bool,
            "glibc: fixed mmap threshold, 2 arenas, free pages handed back every 10 s (runtime/memory.py)",
        ),
        Setting(
            "metrics_host",
            "UNCLIP_METRICS_HOST",
            "",
            str,
            "address the metrics endpoint listens on ('': the service's --host)",
        ),
        #
        #
        # ---- samplers
        # The orchestrator's steps and samplers for requests that leave them unset (unclip.limits.DEFAULTS;
        # `unclip up` takes a model folder's sampling_defaults.json).
        Setting(
            "prior_steps",
            "UNCLIP_PRIOR_STEPS",
            limits.default("prior_num_inference_steps"),
            int,
            "orchestrator: prior steps for requests that leave them unset",
        ),
        Setting(
            "decoder_steps",
            "UNCLIP_DECODER_STEPS",
            limits.default("decoder_num_inference_steps"),
            int,
            "orchestrator: decoder steps for requests that leave them unset",
        ),
        Setting(
            "super_res_steps",
            "UNCLIP_SUPER_RES_STEPS",
            limits.default("super_res_num_inference_steps"),
            int,
            "orchestrator: steps of every upsampler stage for requests that leave them unset",
        ),
        Setting(
            "prior_sampler",
            "UNCLIP_PRIOR_SAMPLER",
            limits.default("sampler"),
            str,
            "orchestrator: prior sampler for requests that leave it unset (unclip, ddim, dpmsolver++)",
        ),
        Setting(
            "decoder_sampler",
            "UNCLIP_DECODER_SAMPLER",
            limits.default("sampler"),
            str,
            "orchestrator: decoder sampler for generations and variations leaving it unset (edits: unclip)",
        ),
        Setting(
            "super_res_sampler",
            "UNCLIP_SUPER_RES_SAMPLER",
            limits.default("sampler"),
            str,
            "orchestrator: upsamplers' sampler for generations, variations leaving it unset (edits: unclip)",
        ),
        Setting(
            "ddim_eta",
            "UNCLIP_DDIM_ETA",
            limits.default("ddim_eta"),
            float,
            "orchestrator: DDIM's eta for requests that leave it unset",
        ),
        Setting(
            "compile_mode",
            "UNCLIP_COMPILE_MODE",
            "",
            str,
            "decoder/upsamplers with UNCLIP_COMPILE: torch.compile mode ('': default; 'reduce-overhead': "
            "CUDA graphs, one per batch size the batcher forms; 'max-autotune')",
        ),
        #
        #
        # ---- provenance
        # Read by the orchestrator (unclip/provenance/config.py); `unclip up` mints a test signer and key.
        Setting(
            "provenance_metadata",
            "UNCLIP_PROVENANCE_METADATA",
            True,
            _bool,
            "orchestrator: PNG text chunks on every image (model, weights hash, request id, seed, "
            "parameters)",
        ),
        Setting(
            "provenance_prompt",
            "UNCLIP_PROVENANCE_PROMPT",
            False,
            _bool,
            "orchestrator: also write the prompt into the PNG metadata (prompts can be private: off by "
            "default)",
        ),
        Setting(
            "deployment_id",
            "UNCLIP_DEPLOYMENT_ID",
            "unclip",
            str,
            "orchestrator: this deployment's name, in the metadata, the C2PA manifest and the watermark "
            "payload",
        ),
        Setting(
            "c2pa",
            "UNCLIP_C2PA",
            True,
            _bool,
            "orchestrator: sign a C2PA manifest into every PNG when a signer (cert + key) is configured",
        ),
        Setting(
            "c2pa_cert",
            "UNCLIP_C2PA_CERT",
            "",
            str,
            "orchestrator: C2PA signer certificate chain, PEM, leaf first (CA-issued, emailProtection EKU)",
        ),
        Setting(
            "c2pa_key", "UNCLIP_C2PA_KEY", "", str, "orchestrator: the signer's private key, PEM (EC P-256)"
        ),
        Setting(
            "c2pa_trust_anchors",
            "UNCLIP_C2PA_TRUST_ANCHORS",
            "",
            str,
            "verify: CA certificates (PEM) whose manifests are ours ('': the CAs in UNCLIP_C2PA_CERT's "
            "chain)",
        ),
        Setting(
            "c2pa_tsa_url",
            "UNCLIP_C2PA_TSA_URL",
            "",
            str,
            "orchestrator: RFC 3161 time-stamp authority for C2PA signatures ('': none, the signing time is "
            "not attested)",
        ),
        Setting(
            "watermark",
            "UNCLIP_WATERMARK",
            True,
            _bool,
            "orchestrator: embed the invisible watermark when a key is configured",
        ),
        Setting(
            "watermark_key_file",
            "UNCLIP_WATERMARK_KEY_FILE",
            "",
            str,
            "orchestrator: file holding the watermark's secret key (at least 16 bytes; '': no watermark)",
        ),
        Setting(
            "watermark_min_size",
            "UNCLIP_WATERMARK_MIN_SIZE",
            128,
            int,
            "orchestrator: smallest image side that is watermarked (below it the mark is not reliable)",
        ),
        #
        #
        # ---- the CLI and the local stack
        Setting(
            "state_dir",
            "UNCLIP_STATE_DIR",
            "",
            str,
            "where `unclip up` publishes the running local stack (stack.json) for the CLI "
            "('': $XDG_STATE_HOME/unclip, else ~/.local/state/unclip)",
        ),
        Setting(
            "model_name",
            "UNCLIP_MODEL_NAME",
            "",
            str,
            "orchestrator: the served model's name in GetCapabilities; gateway: the name when the "
            "orchestrator reports none (`unclip up`: the model folder's name)",
        ),
        Setting(
            "vocabulary",
            "UNCLIP_VOCABULARY",
            "",
            str,
            "orchestrator: the model's vocabulary file (one word a line); a prompt's other words come back "
            "as a warning ('': no check; `unclip up`: the model folder's vocabulary.txt)",
        ),
        #
        #
        # ---- HTTP gateway
        Setting(
            "orchestrator_addr",
            "UNCLIP_ORCHESTRATOR_ADDR",
            "127.0.0.1:50051",
            str,
            "gateway -> orchestrator target (host:port or dns:///name:port)",
        ),
        Setting(
            "public_url",
            "UNCLIP_GATEWAY_PUBLIC_URL",
            "",
            str,
            "gateway: base URL of the image links it serves ('': the request's own scheme and host)",
        ),
        Setting(
            "link_ttl_seconds",
            "UNCLIP_GATEWAY_LINK_TTL_SECONDS",
            3600.0,
            float,
            "gateway: how long a response_format=url link it serves works (without an image bucket)",
        ),
        Setting(
            "link_cache_bytes",
            "UNCLIP_GATEWAY_LINK_CACHE_BYTES",
            512 * 1024 * 1024,
            int,
            "gateway: memory for the PNGs behind its links; the oldest are dropped beyond it",
        ),
        Setting(
            "link_secret",
            "UNCLIP_GATEWAY_LINK_SECRET",
            "",
            str,
            "gateway: HMAC key signing its links ('': a random one per process)",
        ),
        Setting(
            "max_upload_bytes",
            "UNCLIP_GATEWAY_MAX_UPLOAD_BYTES",
            4 * 1024 * 1024,
            int,
            "gateway: largest uploaded image or mask (OpenAI: under 4 MB); bodies over twice that + 1 MiB "
            "are refused with 413 before they are read",
        ),
        Setting(
            "request_timeout_seconds",
            "UNCLIP_GATEWAY_REQUEST_TIMEOUT_SECONDS",
            600.0,
            float,
            "gateway: deadline of one call to the orchestrator",
        ),
        #
        #
    ]
}


def env_default(name: str) -> Any:
    """The value of a setting from its environment variable, else its default."""
    setting = SETTINGS[name]
    raw = os.environ.get(setting.env)
    if raw is None or raw == "":
        return setting.default
    try:
        return setting.type(raw)
    except ValueError as error:
        raise SystemExit(f"{setting.env}={raw!r} is not valid: {error}") from error


def env_is_set(name: str) -> bool:
    """Whether a setting's environment variable is set (non-empty): a caller falling back to something other
    than the default (e.g. the CLI to the running local stack) needs to tell "unset" from "set to default"."""
    return os.environ.get(SETTINGS[name].env, "") != ""


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str], **defaults: Any) -> None:
    """Adds `--name` flags for the given settings; each falls back to its environment variable.

    `defaults` overrides a setting's default for this process (e.g. each stage's own port).
    """
    for name in names:
        setting = SETTINGS[name]
        default = env_default(name)
        if name in defaults and os.environ.get(setting.env) in (None, ""):
            default = defaults[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=setting.type,
            default=default,
            help=f"{setting.help} [env {setting.env}, default {default!r}]",
        )


def table() -> str:
    """The registry as a Markdown table."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        rows.append(f"| `{s.env}` | `--{s.name.replace('_', '-')}` | `{s.default!r}` | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
