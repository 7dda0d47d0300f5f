"""Time from request to the first denoising-step event (not merely "accepted") on an idle stack, next to the
compute it cannot avoid: the encoder's and one prior step's (measured in process on the same weights).

    python -m benchmarks.first_step [--model DIR] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    emit,
    environment,
    generate_request,
    median,
    model_dir,
    own_session,
    start_stack,
    stub,
)

PROMPT = "a red circle above a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    own_session()  # the in-process side competes for the CPU on the stack's terms
    model = model_dir(args.model)
    emit({"benchmark": "first_step", **environment(), "model": str(model)})

    # The unavoidable compute, in process: encode the prompt (with guidance), one prior step.
    import torch

    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine
    from unclip.rng import generators_from_seed

    torch.set_num_threads(1)
    encoder, prior = EncoderEngine.from_pretrained(model), PriorEngine.from_pretrained(model)
    encode, step = [], []
    for i in range(args.repeats):
        began = time.perf_counter()
        text = encoder.encode_text([PROMPT], True)
        encode.append(time.perf_counter() - began)
        began = time.perf_counter()
        prior.sample(
            text.text_embeds, text.text_encoder_hidden_states, text.text_mask, generators_from_seed(i, 1), 2
        )
        step.append((time.perf_counter() - began) / 2)

    stack = start_stack(model)
    try:
        client = stub(stack.address, stack.api_key)
        first, accepted = [], []
        for i in range(args.repeats + 1):
            began = time.perf_counter()
            call = client.GenerateStream(generate_request(PROMPT, 1, i, (25, 25, 7)), timeout=600)
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "accepted" and i:
                    accepted.append(time.perf_counter() - began)
                if kind == "step":
                    if i:  # the first request warms the channels
                        first.append(time.perf_counter() - began)
                    call.cancel()
                    break
            time.sleep(0.5)  # idle again
        budget = 0.050 + median(encode) + median(step)
        emit(
            {
                "accepted_ms": round(1000 * median(accepted), 1),
                "first_step_ms": round(1000 * median(first), 1),
                "encoder_ms": round(1000 * median(encode), 1),
                "prior_step_ms": round(1000 * median(step), 1),
                "target_ms": round(1000 * budget, 1),
                "within_target": median(first) <= budget,
            }
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
