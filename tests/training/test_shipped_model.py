"""The shipped toy model (models/shapes-toy) loads component by component and draws what the prompt says."""

from pathlib import Path

import pytest
import torch

from training.evaluate import COMPONENT_CLASSES, load_components, reference_pipelines, to_tensor
from training.world import COLOR_NAMES, SHAPES, read_attributes

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-toy"


def test_every_karlo_folder_loads_with_its_own_from_pretrained():
    c = load_components(MODEL)
    assert set(c) == set(COMPONENT_CLASSES)
    assert c["tokenizer"].model_max_length == c["prior"].config.num_embeddings
    assert (
        c["decoder"].config.out_channels == 6
        and c["decoder_scheduler"].config.variance_type == "learned_range"
    )
    assert c["text_encoder"].config.projection_dim == c["prior"].config.embedding_dim
    assert c["super_res_first"].config.sample_size == 4 * c["decoder"].config.sample_size == 128
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) < 60e6


@pytest.fixture(scope="module")
def pipelines():
    torch.set_num_threads(1)
    return reference_pipelines(MODEL)


@pytest.mark.parametrize(
    ("prompt", "shape", "background"),
    [
        ("a large red circle on a blue background", "circle", "blue"),
        ("a yellow star on a black background", "star", "black"),
        ("large green square, center, white background", "square", "white"),
    ],
)
def test_reference_pipeline_draws_the_prompt(pipelines, prompt, shape, background):
    t2i, _ = pipelines
    image = t2i(
        prompt,
        generator=torch.Generator().manual_seed(0),
        prior_num_inference_steps=3,
        decoder_num_inference_steps=3,
        super_res_num_inference_steps=2,
    ).images[0]
    assert image.size == (128, 128)
    got = read_attributes(to_tensor([image]))[0]
    assert (SHAPES[got["shape"]], COLOR_NAMES[got["background"]]) == (shape, background), got


def test_variation_keeps_shape_and_colour(pipelines):
    # 8 decoder steps: at 3 the variation path still drifts some colours (see the model card's numbers).
    from training.evaluate import to_pil
    from training.world import render, scenes_from_attributes

    _, var = pipelines
    source = to_pil(
        render(scenes_from_attributes([dict(shape=1, color=1, background=4, size=1, position=0)]), 128)
    )
    image = var(
        image=source,
        generator=torch.Generator().manual_seed(0),
        decoder_num_inference_steps=8,
        super_res_num_inference_steps=3,
    ).images[0]
    got = read_attributes(to_tensor([image]))[0]
    assert (got["shape"], got["color"], got["background"]) == (1, 1, 4), got


def test_upsampler_draws_renders_of_the_world_clean_without_a_droplet():
    # The stack's upsampler engine at the model's defaults (dpmsolver++, 2 steps) on 32 px renders: the strict
    # reader calls its pictures clean, and no GroupNorm group at 128 px has one pixel carrying a fifth of its
    # variance (the spike an upsampler with one channel per group used to set the norm's statistics with,
    # which drew a speck of 40-60 px in every picture; MODEL_CARD.md).
    from services.decoder.engine import UpsamplerEngine
    from training.outline import cleanliness, read_colours
    from training.world import render, sample_scenes

    torch.set_num_threads(1)
    engine = UpsamplerEngine.from_pretrained(MODEL, dtype="float32")
    scenes = sample_scenes(8, torch.Generator().manual_seed(5))
    spikes = []

    def spike(module, args):
        x = args[0].reshape(args[0].shape[0], module.num_groups, -1)
        if args[0].shape[-1] == 128:
            dev = (x - x.mean(-1, keepdim=True)).pow(2)
            spikes.append((dev.amax(-1) / dev.sum(-1)).max().item())

    for m in engine.first.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_pre_hook(spike)
    gens = [torch.Generator().manual_seed(k) for k in range(8)]
    out = engine.upsample(render(scenes, 32), gens, num_inference_steps=2, sampler="dpmsolver++").images
    read = []
    for image in out:
        rgb = (image.clamp(-1, 1) + 1) / 2
        read.append(cleanliness(rgb, *read_colours(rgb)))
    # 2026-12-07, run 7: 6 of 8 clean, largest off-palette blob 1-14 px (a few pixels along an outline),
    # largest single-pixel share of a group's variance < 0.1 % (run 6: 4 of 8, 1-16 px, < 5 %); the
    # upsampler before the fine-tunes: 0 of 8, blobs 43-6,159 px, > 20 %.
    assert sum(r["clean"] for r in read) >= 3, read
    assert max(r["largest_blob_px"] for r in read) <= 24, read
    assert max(spikes) < 0.2, max(spikes)
