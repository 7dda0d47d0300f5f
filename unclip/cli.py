"""The `unclip` command: start the stack, generate, vary and edit images, make a tiny model, run the demo.

Exit codes: 0 done; 2 invalid input (the message names the field); 3 refused by the content policy (the
message says which check); 4 not authenticated / not permitted (no, unknown or revoked API key; a missing
scope); 5 RESOURCE_EXHAUSTED (quota, rate limit or backpressure; the message gives the retry time); 1 anything
else. `unclip verify`: 6 ours but altered, 7 not ours (verify_cli.py). Shared client code (where the stack is,
flag checks, output names, connection errors) is in unclip.cli_common; each further command has its own
module (`unclip demo`: demo_cli.py, `unclip verify`: verify_cli.py, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from unclip.cli_common import UsageError, check_request_flags, connection_problem, output_path

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_REFUSED, EXIT_DENIED, EXIT_EXHAUSTED = 0, 1, 2, 3, 4, 5
DEFAULT_ADDR = "127.0.0.1:50051"


# ---- requests ----------------------------------------------------------------------------------------------


def _sampling_params(args: argparse.Namespace):
    from unclip.v1 import orchestrator_pb2

    params = orchestrator_pb2.SamplingParams()
    for flag, field in [
        ("prior_steps", "prior_num_inference_steps"),
        ("prior_guidance", "prior_guidance_scale"),
        ("decoder_steps", "decoder_num_inference_steps"),
        ("decoder_guidance", "decoder_guidance_scale"),
        ("ddim_eta", "ddim_eta"),
        # --sampler sets every stage; a stage's own flag wins over it
        *[(f"{stage}_sampler", f"{stage}_sampler") for stage in ("prior", "decoder", "super_res")],
    ]:
        value = getattr(args, flag, None)
        if value is None and flag.endswith("_sampler"):
            value = getattr(args, "sampler", None)
        if value is not None:
            setattr(params, field, value)
    if args.super_res_steps:
        try:
            steps = [int(part) for part in args.super_res_steps.split(",")]
        except ValueError as error:
            raise UsageError(
                f"--super-res-steps must be N or N,N,... (whole numbers), got {args.super_res_steps}"
            ) from error
        params.super_res_num_inference_steps.extend(steps)
    return params


def _common(args: argparse.Namespace) -> dict:
    from unclip.limits import LIMITS
    from unclip.v1 import orchestrator_pb2

    check_request_flags(args)
    fields: dict = {"n": args.n, "size": args.size, "params": _sampling_params(args)}
    if args.seed is not None:
        seed = LIMITS["seed"]  # checked here without importing torch (unclip.rng): the CLI starts faster
        if not seed.low <= args.seed <= seed.high:
            raise UsageError(f"seed must be in {seed.low}..{seed.high}, got {args.seed}")
        fields["seed"] = args.seed
    for name in ("n", "size"):
        if not -(2**31) <= fields[name] < 2**31:
            raise UsageError(f"{name} is out of range: {fields[name]}")
    fields["output_format"] = orchestrator_pb2.OUTPUT_FORMAT_PNG
    fields["deterministic"] = args.deterministic
    return fields


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{field}: cannot read {path}: {error.strerror}") from error


class ProgressBar:
    """GenerateStream's events on stderr: a bar redrawn in place on a terminal, one line per stage else."""

    WIDTH = 24

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.started = None

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event) -> None:
        import time

        kind = event.WhichOneof("event")
        if self.started is None:
            self.started = time.monotonic()
        elapsed = time.monotonic() - self.started
        if kind == "accepted":
            self._line(f"accepted ({event.accepted.queue_position} requests ahead)")
        elif kind == "stage_started":
            ahead = event.stage_started.queue_position
            self._line(
                f"{event.stage_started.stage}: started" + (f" ({ahead} queued ahead)" if ahead else "")
            )
        elif kind == "step" and self.tty:
            step = event.step
            done = int(self.WIDTH * step.step / max(1, step.total))
            bar = "#" * done + "." * (self.WIDTH - done)
            self._line(f"{step.stage:<12} [{bar}] {step.step}/{step.total}  {elapsed:5.1f}s")
        elif kind == "stage_finished" and not self.tty:
            self._line(f"{event.stage_finished.stage}: done in {event.stage_finished.seconds:.2f}s")
        elif kind == "result":
            self._line(f"done in {elapsed:.1f}s")
            if self.tty:
                self.stream.write("\n")


def _call(args: argparse.Namespace, method: str, request, prefix: str) -> int:
    from unclip.cli_common import orchestrator_channel
    from unclip.v1 import orchestrator_pb2_grpc

    with orchestrator_channel(args) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        if method == "Generate" and args.progress:
            progress, response = ProgressBar(), None
            for event in stub.GenerateStream(request, timeout=args.timeout, wait_for_ready=args.wait):
                progress(event)
                if event.HasField("result"):
                    response = event.result
            if response is None:
                raise RuntimeError("the progress stream ended without the images")
        else:
            response = getattr(stub, method)(request, timeout=args.timeout, wait_for_ready=args.wait)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {response.seed}  size {response.size}  request {response.request_id}", file=sys.stderr)
    if response.prompt_truncated:
        print("note: the prompt was longer than the text encoder's limit and was truncated", file=sys.stderr)
    if response.withheld:
        categories = ", ".join(response.withheld_categories) or "no category given"
        print(f"{response.withheld} image(s) withheld by the content policy ({categories})", file=sys.stderr)
    for warning in response.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image in response.images:
        path = output_path(out, f"{prefix}-{image.seed}", args.overwrite)
        path.write_bytes(image.png)
        print(path)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from unclip.v1 import orchestrator_pb2

    request = orchestrator_pb2.GenerateRequest(prompt=args.prompt, **_common(args))
    return _call(args, "Generate", request, "generate")


def cmd_vary(args: argparse.Namespace) -> int:
    from unclip.v1 import orchestrator_pb2

    request = orchestrator_pb2.VariationRequest(image=_read(args.image, "image"), **_common(args))
    return _call(args, "CreateVariation", request, "vary")


def cmd_edit(args: argparse.Namespace) -> int:
    from unclip.v1 import orchestrator_pb2

    mask = _read(args.mask, "mask") if args.mask else b""
    request = orchestrator_pb2.EditRequest(
        image=_read(args.image, "image"), mask=mask, prompt=args.prompt, **_common(args)
    )
    return _call(args, "Edit", request, "edit")


# ---- the stack ---------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from unclip.stack import Stack, compute_env, run_until_signalled

    stack = Stack(
        model=args.model,
        port=args.port,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        safety_policy=args.safety_policy,
        grace_seconds=args.grace_seconds,
        replicas=args.replicas,
        extra_env=compute_env(channels_last=args.channels_last, compile=args.compile),
        http_port=args.http_port,
        auth=args.auth,
        tls=args.tls,
    )
    return run_until_signalled(stack, timeout=args.start_timeout)


def cmd_models(args: argparse.Namespace) -> int:
    from unclip.storage import main as storage_main

    return storage_main(args.args)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from unclip.tiny import make_tiny_model

    path = make_tiny_model(args.dir, super_res_stages=args.super_res_stages)
    print(path)
    print(
        "note: a tiny model has RANDOM weights: it starts fast (tests, smoke runs), but its pictures are "
        "noise. For real pictures use the bundled model: unclip up --model models/shapes-toy",
        file=sys.stderr,
    )
    return EXIT_OK


def _replicas(value: str) -> dict[str, int]:
    from unclip.stack import parse_replicas

    try:
        return parse_replicas(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


# ---- argument parsing --------------------------------------------------------------------------------------


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    from unclip.cli_common import addr_help, limit_range

    stacks = "default: the stack's; `unclip info` shows it"
    parser.add_argument("-n", type=int, default=1, help=f"number of images, {limit_range('n')} (default 1)")
    parser.add_argument("--size", type=int, default=0, help="square side in pixels (default: the largest)")
    parser.add_argument("--seed", type=int, default=None, help="0..2^63-1 (default: drawn and printed)")
    parser.add_argument("--out", default="unclip-out", help="folder for the PNGs (default ./unclip-out)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a picture of the same name (default: a new name, e.g. generate-7_2.png)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key [env UNCLIP_API_KEY, else the key the running `unclip up` stack minted]",
    )
    parser.add_argument("--addr", default=None, help=addr_help())
    steps = limit_range("steps")
    parser.add_argument(
        "--prior-steps", type=int, default=None, help=f"prior denoising steps, {steps} ({stacks})"
    )
    parser.add_argument(
        "--decoder-steps", type=int, default=None, help=f"decoder denoising steps, {steps} ({stacks})"
    )
    parser.add_argument(
        "--super-res-steps", default=None, help=f"steps per upsampler stage: N for all, or N,N ({stacks})"
    )
    parser.add_argument("--prior-guidance", type=float, default=None, help=f"prior guidance scale ({stacks})")
    parser.add_argument(
        "--decoder-guidance",
        type=float,
        default=None,
        help=f"decoder guidance scale ({stacks}; edits may have their own)",
    )
    parser.add_argument(
        "--sampler",
        default=None,
        help="sampler of every stage: unclip, ddim or dpmsolver++ (default: the stack's)",
    )
    for stage in ("prior", "decoder", "super-res"):
        parser.add_argument(f"--{stage}-sampler", default=None, help=f"{stage} sampler (default: --sampler)")
    parser.add_argument(
        "--ddim-eta", type=float, default=None, help="DDIM's noise, 0..1 (default 0: deterministic)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    parser.add_argument("--wait", action="store_true", help="wait for the orchestrator to come up")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="no cross-request batching: bit-exact with the request run alone (slower under load)",
    )


def build_parser() -> argparse.ArgumentParser:
    from unclip.runtime import settings

    parser = argparse.ArgumentParser(prog="unclip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start every stage and the orchestrator on 127.0.0.1")
    up.add_argument("--model", default=settings.env_default("model"), help="model folder [env UNCLIP_MODEL]")
    port = settings.env_default("port")
    up.add_argument(
        "--port",
        type=int,
        default=50051 if port is None else port,
        help="orchestrator port (0: a free one) [env UNCLIP_PORT, default 50051]",
    )
    up.add_argument(
        "--log-dir",
        default=None,
        help="one log per process, and the audit log (default: a temporary folder, removed on exit)",
    )
    up.add_argument(
        "--http-port", type=int, default=None, help="also start the HTTP gateway (OpenAI API, page) here"
    )
    up.add_argument(
        "--safety-policy", default=settings.env_default("safety_policy"), help="moderation policy file"
    )
    up.add_argument("--grace-seconds", type=float, default=30.0, help="drain time when stopping")
    up.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for every stage")
    up.add_argument(
        "--replicas",
        type=_replicas,
        default={},
        help="processes per stage, e.g. decoder=2,upsampler=2 (stages: encoder, prior, decoder, upsampler "
        "(every upsampler stage), super_res, super_res_2, safety); the orchestrator fails over between them",
    )
    # Compute options of the decoder's and upsamplers' UNets (BENCHMARKS.md, "Caveats"). Neither is
    # bit-exact with diffusers' reference: channels-last is on by default (its drift is far below a pixel
    # level; it is what makes the stack as fast as diffusers in one process), compile off (minutes of
    # compiling). Unset, the stages follow UNCLIP_CHANNELS_LAST / UNCLIP_COMPILE. Each stage's log says what
    # its UNets run with.
    up.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoder/upsamplers: channels-last UNets (10-16 %% faster upsampler steps on the toy model; "
        "not bit-exact, drift ~1.5e-4) [sets UNCLIP_CHANNELS_LAST for the stages; default: the "
        "environment's, else on]",
    )
    up.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoder/upsamplers: torch.compile the UNets (9-19 %% less CPU on the toy model, but minutes "
        "of compiling at start-up per stage; not bit-exact) [sets UNCLIP_COMPILE for the stages; default: "
        "the environment's, else off]",
    )
    up.add_argument(
        "--no-auth",
        dest="auth",
        action="store_false",
        help="no API keys: anyone who can reach the orchestrator may call it (said in the log)",
    )
    up.add_argument("--no-tls", dest="tls", action="store_false", help="no mTLS between the services")
    up.set_defaults(func=cmd_up)

    generate = commands.add_parser("generate", help="text -> images")
    generate.add_argument("prompt", help="what to draw, in words the model knows")
    _add_request_options(generate)
    generate.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (plain Generate call instead of GenerateStream)",
    )
    generate.set_defaults(func=cmd_generate)

    vary = commands.add_parser("vary", help="variations of an image")
    vary.add_argument("image", help="a square PNG, JPEG or WebP file")
    _add_request_options(vary)
    vary.set_defaults(func=cmd_vary)

    edit = commands.add_parser("edit", help="regenerate the transparent region of an image from a prompt")
    edit.add_argument("image", help="a square PNG file")
    edit.add_argument(
        "prompt", help="the whole picture as it should look after the edit, not only the new part"
    )
    edit.add_argument("--mask", default=None, help="RGBA PNG of the image's size; transparent = regenerate")
    _add_request_options(edit)
    edit.set_defaults(func=cmd_edit)

    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a tiny RANDOM model (tests, smoke runs): fast, but its pictures are noise",
        description="Writes a tiny model with random weights into DIR. It loads in seconds, which suits "
        "tests and smoke runs, but it was never trained: its pictures are noise. For real pictures use the "
        "bundled model (unclip up --model models/shapes-toy).",
    )
    tiny.add_argument("dir", help="folder to write the model into")
    tiny.add_argument(
        "--super-res-stages", type=int, default=1, choices=[1, 2], help="upsampler stages (default 1)"
    )
    tiny.set_defaults(func=cmd_make_tiny_model)

    models = commands.add_parser("models", help="model weights in S3 / MinIO: push DIR URL | pull URL")
    models.add_argument("args", nargs=argparse.REMAINDER, help="as `python -m unclip.storage`")
    models.set_defaults(func=cmd_models)

    from unclip.audit_cli import add_parser as add_audit_parser
    from unclip.certs_cli import add_parser as add_certs_parser
    from unclip.demo_cli import add_parser as add_demo_parser
    from unclip.info_cli import add_parser as add_info_parser
    from unclip.interpolate_cli import add_parsers as add_interpolate_parsers
    from unclip.keys_cli import add_parser as add_keys_parser
    from unclip.usage_cli import add_parser as add_usage_parser
    from unclip.verify_cli import add_parser as add_verify_parser

    add_audit_parser(commands)  # `unclip audit`: print and filter the safety audit log
    add_keys_parser(commands)  # `unclip keys create|list|revoke`
    add_certs_parser(commands)  # `unclip certs mint`: a Kubernetes deployment's certificate Secrets
    add_usage_parser(commands)  # `unclip usage`: images, compute and energy by key or tenant
    add_verify_parser(commands)  # `unclip verify`: provenance check of image files (exit 0 / 6 / 7)
    add_info_parser(commands)  # `unclip info`: the connected stack's capabilities
    add_interpolate_parsers(commands)  # `unclip interpolate` and `unclip diff`
    add_demo_parser(commands)  # `unclip demo`: the stack on the bundled model, 4 pictures, a contact sheet

    return parser


def main(argv: list[str] | None = None) -> int:
    from unclip.cli_common import parse

    args = parse(build_parser(), argv)
    if args.command == "up" and not args.model:
        print("unclip up: --model (or UNCLIP_MODEL) is required", file=sys.stderr)
        return EXIT_INVALID
    try:
        return args.func(args)
    except UsageError as error:
        print(f"unclip {args.command}: invalid input: {error}", file=sys.stderr)
        return EXIT_INVALID
    except grpc.RpcError as error:
        from services.safety.refusal import parse_refusal
        from unclip.escape import printable

        code, details = error.code(), printable(error.details() or "")  # may echo the caller's input
        refusal = parse_refusal(error)
        if refusal is not None:
            categories = ", ".join(refusal.categories) or "unspecified"
            print(
                f"unclip {args.command}: refused by the content policy at the {refusal.stage} check "
                f"({categories})",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        problem = connection_problem(error, getattr(args, "addr", None) or "?", args)
        if problem is not None:
            print(f"unclip {args.command}: {problem}", file=sys.stderr)
            return EXIT_ERROR
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            print(f"unclip {args.command}: invalid input: {details}", file=sys.stderr)
            return EXIT_INVALID
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            from unclip.runtime.errors import retry_after

            hint = retry_after(error)
            when = f"; retry in {hint:.1f} s" if hint is not None else ""
            print(f"unclip {args.command}: refused for now: {details}{when}", file=sys.stderr)
            return EXIT_EXHAUSTED
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            print(f"unclip {args.command}: {code.name}: {details}", file=sys.stderr)
            return EXIT_DENIED
        print(f"unclip {args.command}: {code.name}: {details}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
