"""`unclip demo`: starts every stage of the stack on the bundled model, draws 4 pictures of one prompt,
writes them and a contact sheet, prints their paths and stops the stack again (exit 0; 1 when the stack
cannot start).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from unclip.cli_common import output_path

# Inside the bundled shapes world (one object on a plain background), so the demo shows what the model knows.
DEMO_PROMPT = "a large yellow star on a blue background"
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-toy"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `demo` into a CLI's subparsers; the parsed namespace runs with `cmd_demo(args)`."""
    demo = subparsers.add_parser(
        "demo",
        help="start the stack on the bundled model and draw 4 pictures",
        description="Starts every stage of the stack on the bundled model, draws 4 pictures of one prompt, "
        "writes them and a contact sheet, prints their paths and stops the stack again. Nothing else needs "
        "to run.",
    )
    demo.add_argument("--model", default=None, help="model folder (default: the bundled models/shapes-toy)")
    demo.add_argument(
        "--prompt",
        default=DEMO_PROMPT,
        help=f'what to draw (default "{DEMO_PROMPT}"; the bundled model knows shapes, colours, '
        "sizes and positions)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the first picture (default 0)")
    demo.add_argument("--out", default="demo-out", help="folder for the pictures (default ./demo-out)")
    demo.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the pictures (default 1800)"
    )
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the stack on the bundled model (or a tiny random one), draws 4 images and a contact sheet."""
    import io

    import PIL.Image

    from unclip.cli import EXIT_ERROR, EXIT_OK
    from unclip.stack import Stack, StackError
    from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    if args.model:
        model = Path(args.model)
    elif (BUNDLED_MODEL / "decoder").is_dir():
        model = BUNDLED_MODEL
        print(f"demo: using the bundled model {model}", file=sys.stderr)
    else:
        from unclip.tiny import make_tiny_model

        scratch = tempfile.TemporaryDirectory(prefix="unclip-tiny-")  # removed when the demo ends
        model = make_tiny_model(Path(scratch.name) / "model")
        print(
            f"demo: no bundled model in {BUNDLED_MODEL} yet; using a TINY RANDOM model ({model}): "
            "the pictures will be noise",
            file=sys.stderr,
        )
    print("demo: starting the stack (every stage its own process)...", file=sys.stderr, flush=True)
    stack = Stack(model=str(model), port=0)
    try:
        address = stack.start()
    except StackError as error:
        print(f"demo: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        print(
            f'demo: stack up, orchestrator at {address}; generating 4 images of "{args.prompt}"',
            file=sys.stderr,
        )
        request = orchestrator_pb2.GenerateRequest(prompt=args.prompt, n=4, seed=args.seed)
        started = time.perf_counter()  # every stage ran a warm-up before reporting SERVING
        with stack.channel("orchestrator") as channel:  # carries the stack's own API key
            response = orchestrator_pb2_grpc.ImageServiceStub(channel).Generate(request, timeout=args.timeout)
        print(
            f"demo: {len(response.images)} images at {response.size} px in "
            f"{time.perf_counter() - started:.1f} s (seed {response.seed})",
            file=sys.stderr,
        )
    finally:
        stack.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [PIL.Image.open(io.BytesIO(image.png)).convert("RGB") for image in response.images]
    for image, proto in zip(images, response.images, strict=True):
        path = output_path(out, f"demo-{proto.seed}", overwrite=False)
        image.save(path)
        print(path)
    if images:
        size = images[0].width
        sheet = PIL.Image.new("RGB", (2 * size, ((len(images) + 1) // 2) * size), "white")
        for i, image in enumerate(images):
            sheet.paste(image, ((i % 2) * size, (i // 2) * size))
        sheet_path = output_path(out, "demo-contact-sheet", overwrite=False)
        sheet.save(sheet_path)
        print(sheet_path)
    if response.withheld:
        print(f"demo: {response.withheld} image(s) withheld by the content policy", file=sys.stderr)
    for warning in response.warnings:
        print(f"demo: warning: {warning}", file=sys.stderr)
    return EXIT_OK
