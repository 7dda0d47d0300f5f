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
}


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _float_or_none(value: str) -> float | None:
    return None if value in ("", "none") else float(value)


class InvalidSetting(argparse.ArgumentTypeError, ValueError):
    """A bad value whose message argparse (flags) and env_default (variables) both show as is."""


DTYPES = ("float32", "float16", "bfloat16")  # as unclip.models.DTYPES (kept import-free: no torch here)


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
            "float32",
            _dtype,
            "model stages: weights' precision (float32, float16, bfloat16); wire tensors stay float32",
        ),
        Setting("torch_threads", "UNCLIP_TORCH_THREADS", 1, int, "torch.set_num_threads in model stages"),
        # Compute options of the UNets, read by unclip.models when a stage loads (benchmarks/compute.py
        # measures each; BENCHMARKS.md "Service overhead — H2" has the numbers behind the defaults).
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
            False,
            _bool,
            "decoder/upsamplers (read at load; `unclip up --channels-last`): channels-last UNets (not "
            "bit-exact)",
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
            "orchestrator: requests in progress per caller (the request's user, else its peer)",
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
        #
        #
        # ---- provenance
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
        #
        #
        # ---- HTTP gateway
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
