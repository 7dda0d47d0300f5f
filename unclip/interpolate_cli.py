"""`unclip interpolate` and `unclip diff`: the DALL-E 2 paper's interpolations and text diffs (§3.2-3.3).

Frames are written in order (`interpolate-SEED-00.png`, ...; never over an earlier file: `_2` is added unless
`--overwrite`) with a contact sheet in one row and, on request, an animated GIF / WebP.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

NOISE = {"fixed": "INTERPOLATION_NOISE_FIXED", "inverted": "INTERPOLATION_NOISE_INVERTED"}


def _read(path: str, field: str) -> bytes:
    from unclip.cli_common import UsageError

    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{field}: cannot read {path}: {error.strerror}") from error


def end_of(value: str, field: str):
    """An InterpolationEnd: the file's bytes when `value` names a file, else `value` as a prompt."""
    from unclip.v1 import orchestrator_pb2

    if value and Path(value).is_file():
        return orchestrator_pb2.InterpolationEnd(image=_read(value, field))
    return orchestrator_pb2.InterpolationEnd(prompt=value)


def _shared(args: argparse.Namespace) -> dict:
    """The fields Interpolate and TextDiff share, checked before any call (UsageError names the flag)."""
    from unclip.cli import _sampling_params
    from unclip.cli_common import UsageError, check_request_flags
    from unclip.limits import LIMITS
    from unclip.v1 import orchestrator_pb2

    check_request_flags(args)  # steps against the limits; resolves --addr
    frames = LIMITS["frames"]
    if not frames.low <= args.frames <= frames.high:
        raise UsageError(f"--frames must be in {frames.low}..{frames.high}, got {args.frames}")
    fields: dict = {"frames": args.frames, "size": args.size, "params": _sampling_params(args)}
    if args.seed is not None:
        seed = LIMITS["seed"]
        if not seed.low <= args.seed <= seed.high:
            raise UsageError(f"--seed must be in {seed.low}..{seed.high}, got {args.seed}")
        fields["seed"] = args.seed
    if args.gif:
        fields["animation"] = orchestrator_pb2.ANIMATION_FORMAT_GIF
    elif args.webp:
        fields["animation"] = orchestrator_pb2.ANIMATION_FORMAT_WEBP
    return fields


def cmd_interpolate(args: argparse.Namespace) -> int:
    from unclip.v1 import orchestrator_pb2

    fields = _shared(args)
    request = orchestrator_pb2.InterpolateRequest(
        start=end_of(args.start, "--from"),
        end=end_of(args.end, "--to"),
        noise=orchestrator_pb2.InterpolationNoise.Value(NOISE[args.noise]),
        **fields,
    )
    return _call(args, "Interpolate", request, "interpolate")


def cmd_diff(args: argparse.Namespace) -> int:
    from unclip.v1 import orchestrator_pb2

    fields = _shared(args)
    request = orchestrator_pb2.TextDiffRequest(
        image=_read(args.image, "image"),
        from_caption=args.from_caption,
        to_caption=args.to_caption,
        max_theta=args.max_theta,
        **fields,
    )
    return _call(args, "TextDiff", request, "diff")


def _call(args: argparse.Namespace, method: str, request, prefix: str) -> int:
    import PIL.Image

    from unclip.cli import EXIT_OK
    from unclip.cli_common import orchestrator_channel, output_path
    from unclip.v1 import orchestrator_pb2_grpc

    with orchestrator_channel(args) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        response = getattr(stub, method)(request, timeout=args.timeout, wait_for_ready=args.wait)
    frames = response.frames
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {frames.seed}  size {frames.size}  request {frames.request_id}", file=sys.stderr)
    if frames.withheld:
        categories = ", ".join(frames.withheld_categories) or "no category given"
        print(f"{frames.withheld} frame(s) withheld by the content policy ({categories})", file=sys.stderr)
    stem = f"{prefix}-{frames.seed}"
    images = []
    for image, theta in zip(frames.images, response.thetas, strict=True):
        path = output_path(out, f"{stem}-{image.index:02d}", args.overwrite)
        path.write_bytes(image.png)
        images.append(PIL.Image.open(io.BytesIO(image.png)).convert("RGB"))
        print(path)
        print(f"  frame {image.index}  theta {theta:.3f}", file=sys.stderr)
    if images:  # one row, in frame order
        size = images[0].width
        sheet = PIL.Image.new("RGB", (size * len(images), size), "white")
        for k, image in enumerate(images):
            sheet.paste(image, (k * size, 0))
        path = output_path(out, f"{stem}-sheet", args.overwrite)
        sheet.save(path)
        print(path)
    if response.animation:
        suffix = ".gif" if response.animation_format == 1 else ".webp"
        path = output_path(out, stem, args.overwrite, suffix=suffix)
        path.write_bytes(response.animation)
        print(path)
    return EXIT_OK


def _add_options(parser: argparse.ArgumentParser, frames_help: str) -> None:
    from unclip.cli_common import addr_help, limit_range

    stacks = "default: the stack's"
    parser.add_argument(
        "--frames", type=int, default=8, help=f"{frames_help}, {limit_range('frames')} (default 8)"
    )
    animation = parser.add_mutually_exclusive_group()
    animation.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    animation.add_argument("--webp", action="store_true", help="also write the frames as an animated WebP")
    parser.add_argument("--size", type=int, default=0, help="square side in pixels (default: the largest)")
    parser.add_argument("--seed", type=int, default=None, help="0..2^63-1 (default: drawn and printed)")
    parser.add_argument("--out", default="unclip-out", help="folder for the frames (default ./unclip-out)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out")
    parser.add_argument("--addr", default=None, help=addr_help())
    parser.add_argument(
        "--api-key", default=None, help="API key [env UNCLIP_API_KEY, else the running `unclip up`'s]"
    )
    parser.add_argument("--prior-steps", type=int, default=None, help=f"prior steps, prompt ends ({stacks})")
    parser.add_argument("--decoder-steps", type=int, default=None, help=f"decoder steps ({stacks})")
    parser.add_argument(
        "--super-res-steps", default=None, help=f"steps per upsampler stage: N, or N,N ({stacks})"
    )
    parser.add_argument("--prior-guidance", type=float, default=None, help=f"prior guidance ({stacks})")
    parser.add_argument("--decoder-guidance", type=float, default=None, help=f"decoder guidance ({stacks})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    parser.add_argument("--wait", action="store_true", help="wait for the orchestrator to come up")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    interpolate = commands.add_parser(
        "interpolate",
        help="frames between two images or prompts (the DALL-E 2 paper's interpolation)",
        description="Decodes frames along the spherical interpolation between two CLIP image embeddings. "
        "--from and --to are each a path to an image file or, otherwise, a prompt (drawn by the prior "
        "with the request's seed).",
    )
    interpolate.add_argument(
        "--from", dest="start", required=True, help="first end: an image file or a prompt"
    )
    interpolate.add_argument("--to", dest="end", required=True, help="last end: an image file or a prompt")
    interpolate.add_argument(
        "--noise",
        choices=sorted(NOISE),
        default="fixed",
        help="fixed: every frame starts from the same noise (default); inverted: from the slerp of the two "
        "images' DDIM-inverted latents (image ends only; the ends come back close to the images)",
    )
    _add_options(interpolate, "frames, both ends included")
    interpolate.set_defaults(func=cmd_interpolate)

    diff = commands.add_parser(
        "diff",
        help="move an image toward a new caption (the DALL-E 2 paper's text diff)",
        description="Decodes the image's CLIP embedding moved toward the difference between two captions' "
        "text embeddings, starting from the image's DDIM inversion so the rest of the picture stays.",
    )
    diff.add_argument("image", help="the picture (PNG, JPEG or WebP, square)")
    diff.add_argument("--from-caption", required=True, help="what the picture shows now")
    diff.add_argument("--to-caption", required=True, help="what it should show")
    diff.add_argument(
        "--max-theta", type=float, default=0.5, help="how far the last frame goes, 0 < T <= 1 (default 0.5)"
    )
    _add_options(diff, "frames from the picture (theta 0) to --max-theta")
    diff.set_defaults(func=cmd_diff)
