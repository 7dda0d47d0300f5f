"""benchmarks/karlo_size.py: the Karlo-size random model for the GPU comparison. Its configs are
Karlo's (checked on the meta device: no memory), and a narrowed copy runs the reference pipeline and loads in
the engines through the same code path, so a GPU session can run the benchmark as prepared."""

from __future__ import annotations

import torch
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel

from benchmarks.karlo_size import karlo_configs, make_karlo_size_model


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_size_configs_are_karlos():
    configs = karlo_configs(1.0)
    assert configs["decoder"]["block_out_channels"] == (320, 640, 960, 1280)
    assert configs["decoder"]["cross_attention_dim"] == 1536 and configs["decoder"]["layers_per_block"] == 3
    assert configs["text_proj"]["time_embed_dim"] == 1280  # the decoder's 4 x 320
    assert configs["text_encoder"]["hidden_size"] == 768 and configs["prior"]["embedding_dim"] == 768
    with torch.device("meta"):  # shapes only
        prior = PriorTransformer(**configs["prior"])
        decoder = UNet2DConditionModel(**configs["decoder"])
        super_res = UNet2DModel(**configs["super_res"])
        defaults = PriorTransformer()  # Karlo's prior: diffusers' conversion script uses the defaults
    assert _parameters(prior) == _parameters(defaults) > 1e9
    assert 0.85e9 < _parameters(decoder) < 0.92e9  # Karlo's decoder: ~0.9 B
    assert 0.65e9 < _parameters(super_res) < 0.72e9
    assert decoder.config.sample_size * 4 == super_res.config.sample_size == 256


def test_narrow_copy_runs_the_reference_pipeline_and_loads_in_the_engines(tmp_path):
    from benchmarks.common import reference_pipeline, run_reference

    model = make_karlo_size_model(tmp_path / "karlo", dtype="float32", scale=0.1)
    images = run_reference(reference_pipeline(model), "a red circle", 1, 0, (2, 2, 2))
    assert images.shape == (1, 256, 256, 3)  # 64 px decoder, 256 px super-res: Karlo's cascade
    again = run_reference(reference_pipeline(model), "a red circle", 1, 0, (2, 2, 2))
    assert (images == again).all()  # seeded: the benchmark's two sides can be compared
