"""Latency: the stack (every stage its own process, gRPC over loopback, every safety check on) ÷ diffusers'
in-process UnCLIPPipeline with the same weights and steps, at n=1 and n=4; and the milliseconds the services
add per request.

    python -m benchmarks.latency [--model DIR] [--repeats 5] [--steps 25,25,7]

Without --model a tiny random model is made (compute is small there, so the difference is the overhead).
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    emit,
    environment,
    generate_request,
    median,
    model_dir,
    reference_pipeline,
    run_reference,
    start_stack,
    stub,
    timed,
)

PROMPT = "a red circle above a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", default="25,25,7", help="prior,decoder,super-res steps")
    parser.add_argument("--sizes", default="1,4", help="values of n")
    args = parser.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model)
    emit({"benchmark": "latency", **environment(), "model": str(model), "steps": steps})

    pipe = reference_pipeline(model)
    stack = start_stack(model)
    try:
        client = stub(stack.address)
        for n in (int(v) for v in args.sizes.split(",")):
            request = generate_request(PROMPT, n, 0, steps)
            run_reference(pipe, PROMPT, n, 0, steps)  # warm both sides
            client.Generate(request, timeout=600)
            # Interleave the two sides so machine load drifts hit both alike.
            local, served = [], []
            for _ in range(args.repeats):
                local += timed(lambda n=n: run_reference(pipe, PROMPT, n, 0, steps), 1)
                served += timed(lambda r=request: client.Generate(r, timeout=600), 1)
            ratio = median(served) / median(local)
            emit(
                {
                    "n": n,
                    "in_process_s": round(median(local), 4),
                    "stack_s": round(median(served), 4),
                    "ratio": round(ratio, 3),
                    "overhead_ms": round(1000 * (median(served) - median(local)), 1),
                }
            )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
