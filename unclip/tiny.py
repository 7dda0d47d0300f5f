"""A tiny random unCLIP model in the Karlo layout, for tests and smoke runs.

The components follow diffusers' own fast tests (tests/pipelines/unclip/test_unclip.py and
test_unclip_image_variation.py): CLIP text/vision hidden size 32, a one-layer prior, a 32 px decoder
predicting
mean and variance (6 channels, ``learned_range`` scheduler), a 32 -> 64 px super-resolution stage, and
optionally a
second 64 -> 128 px stage. Weights are random: images are noise-like, but every code path and every tensor
shape
is the real one. The tokenizer is built offline (a byte-level vocabulary plus a few merges), so nothing is
fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

# Sizes of the tiny model (diffusers' dummy components).
TEXT_HIDDEN = 32  # CLIP text/vision width and the CLIP embedding size D
TIME_INPUT_DIM = 32  # first UNet block width
TIME_EMBED_DIM = TIME_INPUT_DIM * 4
CROSS_ATTENTION_DIM = 100
MODEL_MAX_LENGTH = 77  # tokens per prompt (Karlo's value); the prior's num_embeddings must equal it
DECODER_SIZE = 32
SUPER_RES_SIZES = (64, 128)  # output size of stage super_res, super_res_2
# First-block width of the overhead-bound variant (make_tiny_model(width=...); benchmarks/throughput.py
# --tiny-width): diffusers' UnCLIPPipeline runs it at ~2.4 images/s sequentially (25/25/7 steps, one thread of
# the 2-core development machine; 5.1 at n=4, 6.8 at n=16), where the default width runs 0.49.
OVERHEAD_BOUND_WIDTH = 4

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words given whole-word merges, so common prompts take a handful of tokens rather than one per letter.
_MERGE_WORDS = (
    "a an the of on in with and photo painting drawing picture red green blue yellow black white circle "
    "square triangle horse cat dog house tree sky sun moon car boat city mountain river flower bird small big"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level mapping: every byte gets a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def _write_tokenizer(folder: Path, model_max_length: int) -> tuple[int, int, int]:
    """Writes vocab.json + merges.txt + tokenizer_config.json; returns (vocab size, bos id, eos id)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    # Same order as CLIP's vocabulary: bytes, bytes ending a word, merged tokens, then the special tokens.
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    known = set(vocab_list)
    for word in _MERGE_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge, merged = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if merged not in known:
                merges.append(merge)
                vocab_list.append(merged)
                known.add(merged)
            parts = [merged, *parts[2:]]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN]


def _super_res_unet(sample_size: int, width: int = TIME_INPUT_DIM) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size,
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(width, width * 2),
        in_channels=6,  # the noisy sample and the bicubic-upscaled low-resolution image
        out_channels=3,
        **_groups(width),
    )


def _groups(width: int) -> dict:
    """GroupNorm groups for a UNet whose first block is `width` wide: diffusers' default (32) for the
    default width, so the default model's config and weights stay exactly what they were; else one group
    per 4 channels of the first block (GroupNorm needs the groups to divide every block's width)."""
    return {} if width == TIME_INPUT_DIM else {"norm_num_groups": max(1, width // 4)}


def make_tiny_model(
    directory: str | Path,
    *,
    super_res_stages: int = 1,
    variation: bool = True,
    seed: int = 0,
    width: int = TIME_INPUT_DIM,
) -> Path:
    """Writes a tiny random unCLIP model in the Karlo layout into ``directory`` and returns its path.

    super_res_stages: 1 (32 -> 64 px, as Karlo's layout) or 2 (adds ``super_res_2_*``: 64 -> 128 px).
    variation: also write ``image_encoder/`` and ``feature_extractor/`` (CLIP vision) for image variations.
    seed: weights are drawn from ``seed`` (and ``seed + 1`` for super_res_last, so it differs from _first),
    without touching torch's global random state.
    width: channels of the first block of the decoder's and the upsamplers' UNets (the second has twice
    that; the time embedding 4x). The default (32, diffusers' test size) writes exactly the model the tests
    were written for. A smaller width (``OVERHEAD_BOUND_WIDTH``) gives an *overhead-bound* model for the
    throughput benchmark: at width 32 a decoder step costs ~55 ms on one CPU thread and grows linearly
    with the batch, so the benchmark measures only arithmetic; at width 4 the forward passes are so cheap
    that the fixed per-step and per-call costs (Python, module calls, small kernels) dominate, as in the
    issue's tiny model (2.5 images/s in process), and batching requests into one pass shows what it saves.
    Narrow variants use one GroupNorm group per 4 channels and one attention head per block.
    """
    if width < 4 or width % 4:
        raise ValueError(f"width must be a positive multiple of 4, got {width}")
    if super_res_stages not in (1, 2):
        raise ValueError(f"super_res_stages must be 1 or 2, got {super_res_stages}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)

    vocab_size, bos_id, eos_id = _write_tokenizer(root / "tokenizer", MODEL_MAX_LENGTH)

    def seeded(offset: int = 0) -> None:
        torch.manual_seed(seed + offset)

    with torch.random.fork_rng(devices=[]):
        # text encoder
        seeded()
        text_config = CLIPTextConfig(
            bos_token_id=bos_id,
            eos_token_id=eos_id,  # pooled output is taken at the first EOS token
            pad_token_id=eos_id,
            hidden_size=TEXT_HIDDEN,
            projection_dim=TEXT_HIDDEN,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=vocab_size,
            max_position_embeddings=MODEL_MAX_LENGTH,
        )
        CLIPTextModelWithProjection(text_config).save_pretrained(root / "text_encoder")

        # prior
        seeded()
        prior = PriorTransformer(
            num_attention_heads=2,
            attention_head_dim=12,
            embedding_dim=TEXT_HIDDEN,
            num_layers=1,
            num_embeddings=MODEL_MAX_LENGTH,
        )
        # PriorTransformer initialises clip_std to zeros, which makes every sampled embedding equal clip_mean
        # (zero): the decoder would never see what the prior drew. Karlo stores CLIP's statistics here; the
        # tiny
        # model uses unit std and a small random mean so prior samples (and the rerank) matter downstream.
        with torch.no_grad():
            prior.clip_std.fill_(1.0)
            prior.clip_mean.copy_(0.1 * torch.randn_like(prior.clip_mean))
        prior.save_pretrained(root / "prior")
        UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            num_train_timesteps=1000,
            clip_sample_range=5.0,
        ).save_pretrained(root / "prior_scheduler")

        # decoder
        seeded()
        UnCLIPTextProjModel(
            clip_embeddings_dim=TEXT_HIDDEN,
            time_embed_dim=4 * width,  # the UNet's time embedding (4x its first block)
            cross_attention_dim=CROSS_ATTENTION_DIM,
        ).save_pretrained(root / "text_proj")
        seeded()
        UNet2DConditionModel(
            sample_size=DECODER_SIZE,
            in_channels=3,
            out_channels=6,  # mean and variance (learned_range)
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=(width, width * 2),
            layers_per_block=1,
            cross_attention_dim=CROSS_ATTENTION_DIM,
            # one attention head per block in the narrow variant: CPU attention over many 4-wide heads is
            # mostly per-head overhead (at width 8 it was 35 % of a decoder step)
            attention_head_dim=4 if width == TIME_INPUT_DIM else 2 * width,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
            **_groups(width),
        ).save_pretrained(root / "decoder")
        UnCLIPScheduler(
            variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000
        ).save_pretrained(root / "decoder_scheduler")

        # super-resolution stage(s)
        for index in range(super_res_stages):
            stage = "super_res" if index == 0 else f"super_res_{index + 1}"
            seeded(2 * index)
            _super_res_unet(SUPER_RES_SIZES[index], width).save_pretrained(root / f"{stage}_first")
            seeded(2 * index + 1)  # seeded differently so _last differs from _first
            _super_res_unet(SUPER_RES_SIZES[index], width).save_pretrained(root / f"{stage}_last")
            UnCLIPScheduler(
                variance_type="fixed_small_log", prediction_type="epsilon", num_train_timesteps=1000
            ).save_pretrained(root / f"{stage}_scheduler")

        # image encoder (variations)
        if variation:
            seeded()
            vision_config = CLIPVisionConfig(
                hidden_size=TEXT_HIDDEN,
                projection_dim=TEXT_HIDDEN,
                num_hidden_layers=5,
                num_attention_heads=4,
                image_size=32,
                intermediate_size=37,
                patch_size=1,
            )
            CLIPVisionModelWithProjection(vision_config).save_pretrained(root / "image_encoder")
            CLIPImageProcessorPil(crop_size=32, size=32).save_pretrained(root / "feature_extractor")
    return root
