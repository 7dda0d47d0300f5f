"""The strict evaluation's scoring on a perfect model of the world (renders of what each prompt states) and
on a model that draws nothing new; re-reading saved pictures."""

import random

import pytest
import torch

from training.edits import edit_cases
from training.evaluate import fully_specified_prompts, to_pil, variation_sources
from training.evaluate_strict import (
    Saved,
    _save,
    strict_edits,
    strict_text_to_image,
    strict_variations,
)
from training.outline import StrictConfig
from training.world import render, scenes_from_attributes


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the fits are many small operations, which more threads only slow down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def renders(attrs: list[dict], seed: int = 0) -> torch.Tensor:
    return render(scenes_from_attributes(attrs, torch.Generator().manual_seed(seed)), 128)


def test_a_perfect_model_scores_full_marks_and_a_blank_one_none():
    cfg = StrictConfig()
    cases = fully_specified_prompts(3, random.Random(0))
    stated = [
        dict(c.expected, size=c.expected["size"] or 0, position=c.expected["position"] or 0) for c in cases
    ]
    stated = [dict(a, position=0) if a["size"] else a for a in stated]
    images = [to_pil(renders([a], seed=i)) for i, a in enumerate(stated)]
    t2i = strict_text_to_image(cases, [ims * 2 for ims in images], cfg)
    assert t2i["images"] == 6 and t2i["shape_geometry_color_background"] == 1.0 and t2i["clean"] == 1.0

    attrs, sources = variation_sources(2, random.Random(1), 1)
    var = strict_variations(attrs, [[im] for im in sources], cfg)
    assert var["shape_geometry_and_color_kept"] == 1.0 and var["clean_count"] == 2

    attrs, wants, _, sources, mask = edit_cases(2, random.Random(2), 2)
    drawn = []
    for a, w, src in zip(attrs, wants, sources, strict=True):
        wanted = renders([dict(w, background=a["background"], size=0)], seed=3)[0]
        drawn.append(torch.cat([src[..., :64], wanted[..., 64:]], dim=-1)[None])
    good = strict_edits(attrs, wants, sources, mask, drawn, cfg)
    assert (
        good["unmasked_kept"] == 1.0 and good["prompted_object_by_geometry"] == 1.0 and good["clean"] == 1.0
    )
    blank = strict_edits(attrs, wants, sources, mask, [s[None] for s in sources], cfg)
    assert blank["unmasked_kept"] == 1.0 and blank["prompted_object_by_geometry"] == 0.0


def test_saved_pictures_come_back_in_order_eight_prompts_at_a_time(tmp_path):
    attrs = [dict(shape=k % 4, color=0, background=1, size=0, position=k % 5) for k in range(10)]
    pictures = [[im] * 2 for im in to_pil(renders(attrs))]
    _save(pictures[:8], tmp_path, "t2i")
    _save(pictures[8:], tmp_path, "t2i", first=8)
    saved = Saved(str(tmp_path))
    again = saved.generate(["p"] * 8, 2, 0) + saved.generate(["p"] * 2, 2, 16)
    assert [len(x) for x in again] == [2] * 10
    assert all(a[1].tobytes() == b[1].tobytes() for a, b in zip(again, pictures, strict=True))
