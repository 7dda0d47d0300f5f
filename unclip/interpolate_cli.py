"""`unclip interpolate --from A --to B --frames K`: frames between two images or prompts (the DALL-E 2 paper's
interpolation), written in frame order with a contact sheet and, on request, an animated GIF / WebP.

A and B are each a path to an image file (used as an image end) or any other text (a prompt end).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

NOISE = {"fixed": "INTERPOLATION_NOISE_FIXED", "inverted": "INTERPOLATION_NOISE_INVERTED"}


def end_of(value: str, field: str):
    """An InterpolationEnd: the file's bytes when `value` names a file, else `value` as a prompt."""
    from unclip.cli import UsageError
    from unclip.v1 import orchestrator_pb2

    path = Path(value)
    if value and path.is_file():
        try:
            return orchestrator_pb2.InterpolationEnd(image=path.read_bytes())
        except OSError as error:
            raise UsageError(f"{field}: cannot read {value}: {error.strerror}") from error
    return orchestrator_pb2.InterpolationEnd(prompt=value)


def request_of(args: argparse.Namespace):
    from unclip.cli import UsageError, _sampling_params
    from unclip.rng import MAX_SEED
    from unclip.v1 import orchestrator_pb2

    request = orchestrator_pb2.InterpolateRequest(
        start=end_of(args.start, "--from"),
        end=end_of(args.end, "--to"),
        frames=args.frames,
        noise=orchestrator_pb2.InterpolationNoise.Value(NOISE[args.noise]),
        size=args.size,
        params=_sampling_params(args),
    )
    if args.seed is not None:
        if not 0 <= args.seed <= MAX_SEED:
            raise UsageError(f"seed must be in 0..{MAX_SEED}, got {args.seed}")
        request.seed = args.seed
    if args.gif:
        request.animation = orchestrator_pb2.ANIMATION_FORMAT_GIF
    elif args.webp:
        request.animation = orchestrator_pb2.ANIMATION_FORMAT_WEBP
    return request


def cmd_interpolate(args: argparse.Namespace) -> int:
    import PIL.Image

    from unclip.cli import EXIT_OK, UsageError
    from unclip.runtime.server import create_channel
    from unclip.v1 import orchestrator_pb2_grpc

    request = request_of(args)
    with create_channel(args.addr) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        response = stub.Interpolate(request, timeout=args.timeout, wait_for_ready=args.wait)
    frames = response.frames
    out = Path(args.out)
    stem = f"interpolate-{frames.seed}"
    names = [f"{stem}-{image.index:02d}.png" for image in frames.images] + [f"{stem}-sheet.png"]
    if response.animation:
        names.append(f"{stem}.{'gif' if args.gif else 'webp'}")
    taken = [name for name in names if (out / name).exists()]
    if taken and not args.overwrite:
        raise UsageError(f"--out: {out / taken[0]} exists (another --out, another --seed, or --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {frames.seed}  size {frames.size}  request {frames.request_id}", file=sys.stderr)
    if frames.withheld:
        categories = ", ".join(frames.withheld_categories) or "no category given"
        print(f"{frames.withheld} frame(s) withheld by the content policy ({categories})", file=sys.stderr)
    images = []
    for image, theta in zip(frames.images, response.thetas, strict=True):
        path = out / f"{stem}-{image.index:02d}.png"
        path.write_bytes(image.png)
        images.append(PIL.Image.open(io.BytesIO(image.png)).convert("RGB"))
        print(path)
        print(f"  frame {image.index}  theta {theta:.3f}", file=sys.stderr)
    if images:  # one row, in frame order
        size = images[0].width
        sheet = PIL.Image.new("RGB", (size * len(images), size), "white")
        for k, image in enumerate(images):
            sheet.paste(image, (k * size, 0))
        sheet_path = out / f"{stem}-sheet.png"
        sheet.save(sheet_path)
        print(sheet_path)
    if response.animation:
        path = out / names[-1]
        path.write_bytes(response.animation)
        print(path)
    return EXIT_OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    from unclip.cli import DEFAULT_ADDR
    from unclip.runtime import settings

    parser = commands.add_parser(
        "interpolate",
        help="frames between two images or prompts (the DALL-E 2 paper's interpolation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="start", required=True, help="first end: an image file or a prompt")
    parser.add_argument("--to", dest="end", required=True, help="last end: an image file or a prompt")
    parser.add_argument("--frames", type=int, default=8, help="frames, 2..32, both ends included (default 8)")
    parser.add_argument(
        "--noise",
        choices=sorted(NOISE),
        default="fixed",
        help="fixed: every frame starts from the same noise (default); inverted: from the image ends' "
        "DDIM-inverted latents (image ends only)",
    )
    animation = parser.add_mutually_exclusive_group()
    animation.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    animation.add_argument("--webp", action="store_true", help="also write the frames as an animated WebP")
    parser.add_argument("--size", type=int, default=0, help="square side in pixels (default: the largest)")
    parser.add_argument("--seed", type=int, default=None, help="0..2^63-1 (default: drawn and printed)")
    parser.add_argument("--out", default="unclip-out", help="folder for the frames (default ./unclip-out)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out")
    parser.add_argument(
        "--addr",
        default=settings.env_default("addr") or DEFAULT_ADDR,
        help=f"orchestrator address [env UNCLIP_ADDR, default {DEFAULT_ADDR}]",
    )
    parser.add_argument(
        "--prior-steps", type=int, default=None, help="prior steps, prompt ends (stack default)"
    )
    parser.add_argument("--decoder-steps", type=int, default=None, help="decoder steps (the stack's default)")
    parser.add_argument("--super-res-steps", default=None, help="steps per upsampler stage: N, or N,N")
    parser.add_argument("--prior-guidance", type=float, default=None, help="prior guidance (prompt ends)")
    parser.add_argument("--decoder-guidance", type=float, default=None, help="decoder guidance")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    parser.add_argument("--wait", action="store_true", help="wait for the orchestrator to come up")
    parser.set_defaults(func=cmd_interpolate)
