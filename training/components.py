"""Builds the toy model's components (Karlo layout) and the tokenizer for the world's vocabulary.

Every component is a stock diffusers / transformers class, so the model loads folder by folder with
`from_pretrained` and runs in diffusers' UnCLIPPipeline unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from training.world import vocabulary

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


@dataclass
class ModelSizes:
    """Sizes of the toy model (kept small: the demo runs on two CPU cores)."""

    max_tokens: int = 20  # tokenizer.model_max_length == prior.num_embeddings (captions are ≤ 16 tokens)
    embed_dim: int = 128  # CLIP projection dim == text hidden size (the prior and text_proj need them equal)
    text_layers: int = 4
    vision_hidden: int = 128
    vision_layers: int = 4
    clip_image_size: int = 64  # the vision tower's input; CLIPImageProcessor resizes to it
    prior_heads: int = 4
    prior_head_dim: int = 48
    prior_layers: int = 6
    decoder_size: int = 32  # decoder output, px
    decoder_channels: tuple[int, ...] = (64, 128, 128)
    decoder_layers: int = 1
    decoder_head_dim: int = 32
    clip_extra_context_tokens: int = 4
    super_res_size: int = 128  # upsampler output, px
    super_res_channels: tuple[int, ...] = (32, 64, 64)
    super_res_layers: int = 1
    # GroupNorm groups in the upsampler: 8 channels per group at its 32-channel 128 px blocks. With one
    # channel per group (diffusers' default of 32 groups) a channel cannot keep its scale through the norm,
    # and the network learned to set it with a single-pixel spike (StyleGAN's "droplet"): a speck.
    super_res_norm_groups: int = 4


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(directory: str | Path, max_tokens: int) -> CLIPTokenizer:
    """Writes vocab.json + merges.txt for the world's words and loads them as a CLIPTokenizer.

    Byte-pair merges build every word left to right from its letters, so each vocabulary word is one token;
    single letters stay in the vocabulary, so an unknown word still tokenizes (into pieces).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in vocabulary() for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    tokens: list[str] = []
    for c in letters:
        tokens += [c, c + "</w>"]
    merges: list[str] = []
    # Longest words first, so a word's own chain out-ranks a pair that starts a shorter word.
    for word in sorted(vocabulary(), key=lambda w: (-len(w), w)):
        if len(word) == 1:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            if left not in tokens:
                tokens.append(left)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + SPECIAL))}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_tokens
    )
    tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------- models
def build_text_encoder(sz: ModelSizes, vocab_size: int) -> CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=sz.embed_dim,
        intermediate_size=4 * sz.embed_dim,
        projection_dim=sz.embed_dim,
        num_hidden_layers=sz.text_layers,
        num_attention_heads=4,
        max_position_embeddings=sz.max_tokens,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(cfg)


def build_image_encoder(sz: ModelSizes) -> CLIPVisionModelWithProjection:
    cfg = CLIPVisionConfig(
        hidden_size=sz.vision_hidden,
        intermediate_size=4 * sz.vision_hidden,
        projection_dim=sz.embed_dim,
        num_hidden_layers=sz.vision_layers,
        num_attention_heads=4,
        image_size=sz.clip_image_size,
        patch_size=8,
    )
    return CLIPVisionModelWithProjection(cfg)


def build_feature_extractor(sz: ModelSizes) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": sz.clip_image_size},
        resample=3,
        do_center_crop=True,
        crop_size={"height": sz.clip_image_size, "width": sz.clip_image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def build_prior(sz: ModelSizes) -> PriorTransformer:
    return PriorTransformer(
        num_attention_heads=sz.prior_heads,
        attention_head_dim=sz.prior_head_dim,
        num_layers=sz.prior_layers,
        embedding_dim=sz.embed_dim,
        num_embeddings=sz.max_tokens,
        additional_embeddings=4,
        dropout=0.0,
    )


def build_text_proj(sz: ModelSizes) -> UnCLIPTextProjModel:
    return UnCLIPTextProjModel(
        clip_extra_context_tokens=sz.clip_extra_context_tokens,
        clip_embeddings_dim=sz.embed_dim,
        time_embed_dim=sz.decoder_channels[0] * 4,
        cross_attention_dim=sz.decoder_channels[-1],
    )


def build_decoder(sz: ModelSizes) -> UNet2DConditionModel:
    n = len(sz.decoder_channels)
    return UNet2DConditionModel(
        sample_size=sz.decoder_size,
        in_channels=3,
        out_channels=6,  # ε/x₀ half + variance half
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=sz.decoder_channels,
        layers_per_block=sz.decoder_layers,
        cross_attention_dim=sz.decoder_channels[-1],
        attention_head_dim=sz.decoder_head_dim,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )


def build_super_res(sz: ModelSizes) -> UNet2DModel:
    n = len(sz.super_res_channels)
    # Convolution only, as the DALL-E 2 paper's upsamplers (trained on crops, run on the whole image):
    # UNet2DModel adds a self-attention to its mid block unless told not to, and in the upsampler it learned
    # to send up to 30 % of all attention to one 32 px cell. Norm groups: ModelSizes.super_res_norm_groups
    # (MODEL_CARD.md, "The speck: a single-pixel spike that sets GroupNorm's statistics").
    return UNet2DModel(
        sample_size=sz.super_res_size,
        add_attention=False,
        in_channels=6,
        out_channels=3,
        layers_per_block=sz.super_res_layers,
        down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n,
        block_out_channels=sz.super_res_channels,
        norm_num_groups=sz.super_res_norm_groups,
        resnet_time_scale_shift="scale_shift",
    )


# Scheduler configs: the cosine (squaredcos_cap_v2) schedule of UnCLIPScheduler, x₀ ("sample") prediction.
PRIOR_SCHEDULER = dict(
    variance_type="fixed_small_log",
    clip_sample=True,
    clip_sample_range=5.0,
    prediction_type="sample",
    num_train_timesteps=1000,
)
DECODER_SCHEDULER = dict(
    variance_type="learned_range",
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type="sample",
    num_train_timesteps=1000,
)
SUPER_RES_SCHEDULER = dict(
    variance_type="fixed_small_log",
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type="sample",
    num_train_timesteps=1000,
)


def save_schedulers(model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    for name, cfg in (
        ("prior_scheduler", PRIOR_SCHEDULER),
        ("decoder_scheduler", DECODER_SCHEDULER),
        ("super_res_scheduler", SUPER_RES_SCHEDULER),
    ):
        UnCLIPScheduler(**cfg).save_pretrained(model_dir / name)
