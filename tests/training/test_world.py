"""The shapes world: captions agree with the pictures they describe (read back from pixels, no CLIP)."""

import random

import torch

from training.components import build_tokenizer
from training.world import (
    COLOR_NAMES,
    NUM_PHRASINGS,
    POSITIONS,
    SHAPES,
    Mention,
    caption,
    parse_caption,
    random_captions,
    read_attributes,
    render,
    sample_scenes,
    scenes_from_attributes,
    vocabulary,
)

KEYS = ("shape", "color", "background", "size", "position")


def test_captions_agree_with_pictures():
    g = torch.Generator().manual_seed(0)
    scenes = sample_scenes(120, g)
    texts, _ = random_captions(scenes, random.Random(0))
    got = read_attributes(render(scenes, 128))
    for i, (text, pix) in enumerate(zip(texts, got, strict=True)):
        stated = parse_caption(text)
        truth = scenes.index(i)
        for key in KEYS:
            if stated[key] is not None:  # what the caption says is what the picture shows
                assert stated[key] == truth[key] == pix[key], (text, key, truth, pix)


def test_every_phrasing_states_every_attribute_when_asked():
    rng = random.Random(1)
    for phrasing in range(NUM_PHRASINGS):
        attrs = dict(shape=3, color=4, background=6, size=0, position=2)
        text = caption(attrs, Mention(), phrasing, rng)
        assert parse_caption(text) == attrs, text


def test_pixels_show_the_palette_and_the_layout():
    # Independent of the reader: the corner pixel is the background colour, the object's centre its colour.
    attrs = [dict(shape=s, color=1, background=6, size=0, position=p) for s in range(4) for p in range(5)]
    scenes = scenes_from_attributes(attrs, torch.Generator().manual_seed(3))
    img = ((render(scenes, 64) + 1) * 127.5).round()
    assert torch.equal(img[:, :, 0, 0], torch.tensor([250.0, 250.0, 250.0]).expand(len(attrs), 3))  # #FAFAFA
    centres = {0: (32, 32), 1: (16, 16), 2: (16, 48), 3: (48, 16), 4: (48, 48)}  # (row, col)
    for i, a in enumerate(attrs):
        r, c = centres[a["position"]]
        assert img[i, :, r, c].tolist() == [67.0, 160.0, 71.0], (SHAPES[a["shape"]], POSITIONS[a["position"]])


def test_sizes_and_positions_differ_in_pixels():
    small = scenes_from_attributes([dict(shape=0, color=0, background=2, size=0, position=0)])
    large = scenes_from_attributes([dict(shape=0, color=0, background=2, size=1, position=0)])
    area = [
        float(((render(s, 64) - render(s, 64)[:, :, :1, :1]).abs().sum(1) > 0.1).float().mean())
        for s in (small, large)
    ]
    assert 0.05 < area[0] < 0.15 and 0.3 < area[1] < 0.5  # a third / two thirds of the side


def test_object_never_matches_background_and_large_is_centred():
    s = sample_scenes(2000, torch.Generator().manual_seed(5))
    assert bool((s.color != s.background).all())
    assert bool((s.position[s.size == 1] == 0).all())
    assert set(s.background.tolist()) == set(range(len(COLOR_NAMES)))


def test_tokenizer_makes_one_token_per_word(tmp_path):
    tok = build_tokenizer(tmp_path, 20)
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    texts, _ = random_captions(sample_scenes(500), random.Random(2))
    assert max(len(tok(t).input_ids) for t in texts) <= tok.model_max_length
