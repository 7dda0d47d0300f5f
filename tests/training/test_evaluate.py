"""The diversity check's arithmetic: what a perfect model of the world scores on under-specified prompts."""

import random

import pytest

from training.evaluate import DIVERSITY_PROMPTS, _diversity_checks, perfect_model_pass


def exact_all_seen(probabilities: list[float], draws: int) -> float:
    """P(every outcome with these per-draw probabilities is seen in `draws` draws), by inclusion-exclusion."""
    from itertools import combinations

    total = 0.0
    for k in range(len(probabilities) + 1):
        for missed in combinations(probabilities, k):
            total += (-1) ** k * (1 - sum(missed)) ** draws
    return total


@pytest.mark.parametrize(
    ("prompt", "exact", "about"),
    [
        # size left out: large (centred) half the time, each corner 10 % -> all positions seen ~41 %
        ("a red circle", exact_all_seen([0.5, 0.1, 0.1, 0.1, 0.1], 16), 0.415),
        # "small" stated: each position 20 % -> ~86 %
        ("a small red circle", exact_all_seen([0.2] * 5, 16), 0.862),
    ],
)
def test_perfect_model_pass_matches_the_exact_chance(prompt, exact, about):
    assert exact == pytest.approx(about, abs=0.001)
    assert perfect_model_pass(prompt, DIVERSITY_PROMPTS[prompt], 16) == pytest.approx(exact, abs=0.03)


def test_checks_fail_on_a_missing_position_and_a_dominant_background():
    rng = random.Random(0)
    draws = [dict(background=rng.randrange(8), color=0, size=0, position=i % 4) for i in range(16)]
    assert not _diversity_checks(draws, ("background", "position"))["ok"]  # position 4 never drawn
    draws[0]["position"] = 4
    assert _diversity_checks(draws, ("background", "position"))["ok"]
    for d in draws[:9]:
        d["background"] = 3  # 9 of 16 > 50 %
    assert not _diversity_checks(draws, ("background", "position"))["ok"]


def test_stack_backend_edits_keep_the_stacks_edit_guidance(stack):
    """`--decoder-guidance-scale` is for text-to-image and variations: the Stack backend's edits keep the
    stack's own edit default unless `--edit-decoder-guidance-scale` overrides it (the real shared stack)."""
    import numpy as np
    from PIL import Image

    from training.evaluate import Stack

    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))  # transparent right half: regenerated
    case = ([image], [mask], ["a blue square"], 1, 3)

    def pixels(backend_sampling: dict, **overrides: float) -> np.ndarray:
        backend = Stack(stack.address, backend_sampling, api_key=stack.running.api_key)
        return np.asarray(backend.edit(*case, **overrides)[0][0])

    plain = pixels(steps)
    assert np.array_equal(pixels({**steps, "decoder_guidance_scale": 2.0}), plain)
    assert not np.array_equal(pixels(steps, decoder_guidance_scale=2.0), plain)
