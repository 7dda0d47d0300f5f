"""The per-image generator contract, Karlo-layout loading, and the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import CLIPTokenizer

from unclip import models
from unclip.rng import (
    GENERATOR_STATE_BYTES,
    MAX_SEED,
    derive_generator,
    generator_from_bytes,
    generator_to_bytes,
    generators_from_seed,
    randn_per_image,
)
from unclip.tiny import make_tiny_model

# rng


def test_image_i_owns_seed_plus_i():
    generators = generators_from_seed(100, 3)
    for i, generator in enumerate(generators):
        assert torch.equal(
            torch.randn(4, generator=generator), torch.randn(4, generator=torch.manual_seed(100 + i))
        )


def test_generator_state_round_trip_continues_the_same_stream():
    generator = generators_from_seed(7, 1)[0]
    torch.randn(10, generator=generator)  # advance it, as a stage would
    data = generator_to_bytes(generator)
    assert isinstance(data, bytes) and len(data) == GENERATOR_STATE_BYTES
    restored = generator_from_bytes(data)
    assert torch.equal(torch.randn(5, generator=restored), torch.randn(5, generator=generator))


@pytest.mark.parametrize("data", [b"", b"\0" * 100, b"\0" * (GENERATOR_STATE_BYTES + 1)])
def test_malformed_generator_state_is_a_value_error(data):
    with pytest.raises(ValueError, match=r"^generators\[2\] state must be 5056 bytes"):
        generator_from_bytes(data, "generators[2]")


@pytest.mark.parametrize(
    ("seed", "n", "field"), [(-1, 1, "seed"), (MAX_SEED + 1, 1, "seed"), (0, 0, "n"), (0, 11, "n")]
)
def test_generators_from_seed_checks_its_arguments(seed, n, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        generators_from_seed(seed, n)


def test_randn_per_image_equals_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    ours = randn_per_image((3, 2, 4, 4), generators_from_seed(5, 3))
    theirs = randn_tensor((3, 2, 4, 4), generator=generators_from_seed(5, 3))
    assert torch.equal(ours, theirs)


def test_derived_generators_leave_the_parent_untouched():
    parent = generators_from_seed(1, 1)[0]
    before = parent.get_state()
    children = [derive_generator(parent, j) for j in (1, 2)]
    assert torch.equal(parent.get_state(), before)
    first, second = (torch.randn(4, generator=child) for child in children)
    assert not torch.equal(first, second)
    assert torch.equal(torch.randn(4, generator=derive_generator(generators_from_seed(1, 1)[0], 1)), first)


# models


def test_tiny_model_has_the_karlo_layout(tiny_model_dir, cascade_model_dir):
    for folder in (
        "tokenizer",
        "text_encoder",
        "prior",
        "prior_scheduler",
        "text_proj",
        "decoder",
        "decoder_scheduler",
        "super_res_first",
        "super_res_last",
        "super_res_scheduler",
        "image_encoder",
        "feature_extractor",
    ):
        assert (tiny_model_dir / folder).is_dir(), folder
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_model_dir / "tokenizer" / "merges.txt").is_file()
    assert models.upsampler_stages(tiny_model_dir) == ["super_res"]
    assert models.upsampler_stages(cascade_model_dir) == ["super_res", "super_res_2"]
    assert not (cascade_model_dir / "image_encoder").exists()


def test_tiny_tokenizer_loads_offline_and_matches_the_prior(tiny_model_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a horse").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    prior = models.load_prior(tiny_model_dir)
    assert prior.config.num_embeddings == tokenizer.model_max_length


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    a = make_tiny_model(tmp_path / "a", variation=False, seed=3)
    b = make_tiny_model(tmp_path / "b", variation=False, seed=3)
    c = make_tiny_model(tmp_path / "c", variation=False, seed=4)
    weights = [(d / "decoder" / "diffusion_pytorch_model.safetensors").read_bytes() for d in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    first, last, _ = models.load_super_res(a)
    assert not torch.equal(
        first.conv_in.weight, last.conv_in.weight
    )  # _first and _last differ, as in diffusers


def test_missing_folder_error_names_it(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "decoder_scheduler")
    with pytest.raises(models.ModelLoadError, match=r"no decoder_scheduler/ folder"):
        models.load_scheduler(model, "decoder_scheduler")
    shutil.rmtree(model / "super_res_last")
    assert models.upsampler_stages(model) == []
    with pytest.raises(models.ModelLoadError, match=r"no super_res_last/ folder"):
        models.load_super_res(model, "super_res")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(models.ModelLoadError, match="only local folders and s3://"):
        models.resolve_model_dir("https://example.com/model")
    # s3:// references go to unclip.storage; a malformed one fails before any network call.
    with pytest.raises(models.ModelLoadError, match="not an S3 bucket name"):
        models.resolve_model_dir("s3://Not_A_Bucket/model")


def test_prior_and_tokenizer_lengths_must_agree(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        models.ModelLoadError, match=r"num_embeddings \(77\) must equal .*model_max_length \(64\)"
    ):
        models.load_prior(model)
