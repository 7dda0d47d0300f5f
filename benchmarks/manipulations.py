"""The paper's manipulations on the bundled model, measured through a running stack (`unclip up --model
models/shapes-toy`): how well inverted interpolation ends reconstruct their images, and how often a text
diff from "a ... red circle ..." to "a ... blue circle ..." turns the circle blue while it stays a circle of
the same size in the same place.

    python -m benchmarks.manipulations --addr 127.0.0.1:50051 --cases 20 --max-theta 0.5

Pictures are read by the world's own reader (training.world.read_attributes), not by CLIP. Sources are renders
of the world (random size and position, red circle on a random background other than red and blue).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time

import numpy as np
import PIL.Image
import torch

from training.world import (
    COLOR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    read_attributes,
    render,
    scenes_from_attributes,
)


def render_png(attrs: dict, seed: int) -> bytes:
    pixels = render(scenes_from_attributes([attrs], generator=torch.Generator().manual_seed(seed)), 128)[0]
    array = ((pixels.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def read(png: bytes) -> dict[str, int]:
    tensor = torch.from_numpy(pixels(png) / 127.5 - 1).permute(2, 0, 1).float()[None]
    return read_attributes(tensor)[0]


def caption(attrs: dict, color: str) -> str:
    return (
        f"a {SIZES[attrs['size']]} {color} circle in the {POSITIONS[attrs['position']]} on a "
        f"{COLOR_NAMES[attrs['background']]} background"
    )


def text_diff_cases(count: int, seed: int = 0) -> list[dict]:
    """Red circles on backgrounds other than red and blue, of random size and position as the world has them
    (a large object is always centred)."""
    rng = random.Random(seed)
    backgrounds = [c for c in range(len(COLOR_NAMES)) if COLOR_NAMES[c] not in ("red", "blue")]
    cases = []
    for _ in range(count):
        size = rng.randrange(len(SIZES))
        cases.append(
            dict(
                shape=SHAPES.index("circle"),
                color=COLOR_NAMES.index("red"),
                background=rng.choice(backgrounds),
                size=size,
                position=0 if SIZES[size] == "large" else rng.randrange(len(POSITIONS)),
            )
        )
    return cases


def run_text_diffs(stub, cases: list[dict], max_theta: float, frames: int = 2) -> list[dict]:
    from unclip.v1 import orchestrator_pb2 as pb

    results = []
    for k, attrs in enumerate(cases):
        response = stub.TextDiff(
            pb.TextDiffRequest(
                image=render_png(attrs, k),
                from_caption=caption(attrs, "red"),
                to_caption=caption(attrs, "blue"),
                frames=frames,
                max_theta=max_theta,
                seed=k,
            ),
            timeout=600,
        )
        got = read(response.frames.images[-1].png)
        want = {**attrs, "color": COLOR_NAMES.index("blue")}
        results.append({"case": k, "want": want, "got": got, "ok": all(got[a] == want[a] for a in want)})
    return results


def reconstruction_error(stub, sources: list[bytes], seed: int = 0) -> list[float]:
    """Mean absolute error (0..255 per channel) of each end of an inverted interpolation against its image."""
    from unclip.v1 import orchestrator_pb2 as pb

    response = stub.Interpolate(
        pb.InterpolateRequest(
            start=pb.InterpolationEnd(image=sources[0]),
            end=pb.InterpolationEnd(image=sources[1]),
            frames=2,
            noise=pb.INTERPOLATION_NOISE_INVERTED,
            seed=seed,
        ),
        timeout=600,
    )
    ends = [response.frames.images[0].png, response.frames.images[-1].png]
    return [float(np.abs(pixels(end) - pixels(src)).mean()) for end, src in zip(ends, sources, strict=True)]


def main(argv: list[str] | None = None) -> int:
    import grpc

    from unclip.v1 import orchestrator_pb2_grpc

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--addr", required=True, help="the orchestrator of a stack on models/shapes-toy")
    parser.add_argument("--api-key", default="", help="a key, when the stack authenticates")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--max-theta", type=float, default=0.5)
    parser.add_argument("--skip-reconstruction", action="store_true")
    args = parser.parse_args(argv)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    channel = grpc.insecure_channel(args.addr)
    stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
    if metadata:
        stub = _with_metadata(stub, metadata)
    started = time.perf_counter()
    diffs = run_text_diffs(stub, text_diff_cases(args.cases), args.max_theta)
    cases = text_diff_cases(4, seed=1)
    errors = []
    for k in range(0, 0 if args.skip_reconstruction else 4, 2):
        square = {**cases[k + 1], "shape": SHAPES.index("square")}
        errors += reconstruction_error(stub, [render_png(cases[k], k), render_png(square, k + 1)], seed=k)
    summary = {
        "text_diff_ok": sum(r["ok"] for r in diffs),
        "text_diff_cases": len(diffs),
        "max_theta": args.max_theta,
        "inverted_end_mae": errors,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({"summary": summary, "text_diffs": diffs}, indent=1))
    return 0


def _with_metadata(stub, metadata):
    class Wrapped:
        def __getattr__(self, name):
            method = getattr(stub, name)
            return lambda request, **kw: method(request, metadata=metadata, **kw)

    return Wrapped()


if __name__ == "__main__":
    sys.exit(main())
