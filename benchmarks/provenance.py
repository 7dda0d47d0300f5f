"""What provenance costs per image: time and bytes of the metadata chunks, the C2PA manifest (signed with a
freshly minted test signer), the watermark, and a full verify, at a few sizes.

    python -m benchmarks.provenance --sizes 128,256,1024 --repeats 20

Images are synthetic photos (benchmarks/watermark.py) encoded as the orchestrator encodes them. Median
times, in ms; bytes added to the PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.watermark import synthetic_photos
from unclip.provenance.c2pa_manifest import C2paSigner, ManifestReader
from unclip.provenance.certs import mint_test_signer
from unclip.provenance.metadata import GenerationRecord, add_text_chunks
from unclip.provenance.verify import Verifier, verify_png
from unclip.provenance.watermark import Watermark, payload_for
from unclip.runtime.images import encode_png


def median_ms(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,256,1024")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    signer_files = mint_test_signer(Path(tempfile.mkdtemp(prefix="unclip-bench-signer-")))
    signer = C2paSigner.from_files(signer_files.cert, signer_files.key)
    mark = Watermark(signer_files.watermark_key.read_bytes())
    verifier = Verifier(ManifestReader(signer_files.ca.read_text()), mark, "bench")
    for size in (int(s) for s in args.sizes.split(",")):
        pixels = synthetic_photos(1, size, size)[0]
        record = GenerationRecord(
            "shapes-toy", "0" * 64, "bench", "f" * 32, 0, 7, size, "2026-12-06T00:00:00.000Z", "generate",
            {"prior": {"steps": 25, "guidance_scale": 4.0}, "decoder": {"steps": 25, "guidance_scale": 8.0}},
            watermark=True,
        )  # fmt: skip
        embed_ms, marked = median_ms(lambda p=pixels: mark.embed(p, payload_for("bench", 7)), args.repeats)
        png = encode_png(torch.from_numpy(np.asarray(marked, dtype=np.float32)))
        chunks_ms, with_chunks = median_ms(
            lambda p=png, r=record: add_text_chunks(p, r.text_chunks()), args.repeats
        )
        sign_ms, signed = median_ms(lambda p=with_chunks, r=record: signer.sign(p, r), args.repeats)
        verify_ms, result = median_ms(lambda p=signed: verify_png(p, verifier), max(3, args.repeats // 4))
        print(
            json.dumps(
                {
                    "size": size,
                    "png_bytes": len(png),
                    "metadata_bytes": len(with_chunks) - len(png),
                    "metadata_ms": round(chunks_ms, 3),
                    "c2pa_bytes": len(signed) - len(with_chunks),
                    "c2pa_sign_ms": round(sign_ms, 2),
                    "watermark_embed_ms": round(embed_ms, 2),
                    "verify_ms": round(verify_ms, 1),
                    "verdict": result.verdict,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
