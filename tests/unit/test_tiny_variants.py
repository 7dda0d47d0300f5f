"""make_tiny_model(width=...): the overhead-bound variant of the tiny model (benchmarks/throughput.py
--tiny-width) is a complete, loadable model; the default stays the model the other tests were written for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unclip.tiny import OVERHEAD_BOUND_WIDTH, make_tiny_model


def config(model, component: str) -> dict:
    return json.loads((model / component / "config.json").read_text())


def test_default_width_keeps_diffusers_test_sizes(tmp_path):
    model = make_tiny_model(tmp_path / "m", variation=False)
    decoder = config(model, "decoder")
    assert decoder["block_out_channels"] == [32, 64]
    assert decoder["norm_num_groups"] == 32 and decoder["attention_head_dim"] == 4
    assert config(model, "text_proj")["time_embed_dim"] == 128
    for part in ("super_res_first", "super_res_last"):
        assert config(model, part)["block_out_channels"] == [32, 64]
        assert config(model, part)["norm_num_groups"] == 32


def test_narrow_variant_runs_the_reference_pipeline(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.common import reference_pipeline, run_reference

    model = make_tiny_model(tmp_path / "m", variation=False, width=OVERHEAD_BOUND_WIDTH)
    decoder = config(model, "decoder")
    assert decoder["block_out_channels"] == [OVERHEAD_BOUND_WIDTH, 2 * OVERHEAD_BOUND_WIDTH]
    assert config(model, "text_proj")["time_embed_dim"] == 4 * OVERHEAD_BOUND_WIDTH
    assert config(model, "super_res_first")["block_out_channels"] == [OVERHEAD_BOUND_WIDTH, 8]
    wide = make_tiny_model(tmp_path / "wide", variation=False)

    def weights(root, part):
        return sum(t.numel() for t in load_file(next((root / part).glob("*.safetensors"))).values())

    assert weights(model, "decoder") < weights(wide, "decoder") / 10  # far less arithmetic per step

    pipe = reference_pipeline(model)
    images = run_reference(pipe, "a red circle", 2, 0, (2, 2, 2))
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    again = run_reference(pipe, "a red circle", 2, 0, (2, 2, 2))
    assert np.array_equal(images, again)  # seeded: the variant is as reproducible as the default


@pytest.mark.parametrize("width", [0, 6, -4])
def test_bad_width_is_refused_naming_it(tmp_path, width):
    with pytest.raises(ValueError, match="width"):
        make_tiny_model(tmp_path / "m", width=width)
