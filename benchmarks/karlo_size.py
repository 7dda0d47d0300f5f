"""Karlo-size random-weight model on a GPU: the stack against diffusers' in-process pipeline, same card, fp16
(images/s of both, whenever a GPU is available).

    python -m benchmarks.karlo_size [--dir /tmp/karlo-size] [--clients 1,4,16] [--seconds 30]
        [--steps 25,25,7] [--baseline-batches 1,4,8] [--dtype float16] [--device cuda]
        [--compile reduce-overhead] [--max-batch-size 16]

`--compile MODE` torch.compiles the stages' decoder and upsampler UNets (UNCLIP_COMPILE, UNCLIP_COMPILE_MODE;
`reduce-overhead` records a CUDA graph per batch size the step batcher forms, so the card stops waiting on
Python kernel launches); `--max-batch-size` raises the stages' batch (a GPU takes far more than the CPU
default of 8). The in-process diffusers side stays eager.

Writes (once; an existing folder is reused) a model in the Karlo layout with kakaobrain/karlo-v1-alpha's
architectures — the configs of diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py: PriorTransformer
at its defaults (20 layers, 32 heads of 64, CLIP dim 768), a 64 px decoder UNet (320/640/960/1280, three
layers a block, cross-attention 1536), 64 -> 256 px super-res UNets (first and last, convolution only), a CLIP
ViT-L/14-size text encoder — with random weights stored in `--dtype`, then runs `benchmarks.throughput` on
it. The tokenizer is the tiny model's offline byte-level one (Karlo's CLIP BPE cannot be fetched); the text
encoder's vocabulary follows it, which changes nothing measurable. About 3.5 G parameters: ~7 GB in fp16 per
copy, and the run holds two (stages + pipeline), so it needs a GPU of 24 GB or more.

`--scale` (< 1) narrows every width for a CPU smoke run of the same code path (tests/unit/test_karlo_size.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

# Karlo's configs (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py; PRIOR_CONFIG = {}: the
# PriorTransformer defaults).
DECODER_CONFIG = dict(
    sample_size=64,
    layers_per_block=3,
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    block_out_channels=(320, 640, 960, 1280),
    in_channels=3,
    out_channels=6,  # mean and variance (learned_range)
    cross_attention_dim=1536,
    attention_head_dim=64,
    resnet_time_scale_shift="scale_shift",
    class_embed_type="identity",
)
SUPER_RES_CONFIG = dict(
    sample_size=256,
    layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) * 4,
    up_block_types=("ResnetUpsampleBlock2D",) * 4,
    block_out_channels=(320, 640, 960, 1280),
    in_channels=6,  # the noisy sample and the upscaled low-resolution image
    out_channels=3,
    add_attention=False,
)
CLIP_DIM = 768  # ViT-L/14's embedding size
TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
MAX_LENGTH = 77


def _narrow(width: int, scale: float, multiple: int = 32) -> int:
    """`width * scale` rounded to a multiple of `multiple` (norm groups, attention heads), at least one."""
    return max(multiple, round(width * scale / multiple) * multiple)


def karlo_configs(scale: float = 1.0) -> dict[str, dict]:
    """Every component's config; `scale` < 1 narrows widths (a CPU smoke run), 1 is Karlo's."""
    block = tuple(_narrow(c, scale) for c in DECODER_CONFIG["block_out_channels"])
    head = 64 if scale == 1.0 else 32
    clip = _narrow(CLIP_DIM, scale, head)
    text = {
        **TEXT_CONFIG,
        "hidden_size": clip,
        "intermediate_size": 4 * clip,
        "num_attention_heads": clip // head,
    }
    if scale != 1.0:
        text["num_hidden_layers"] = 2
    return {
        "prior": dict(
            num_attention_heads=32 if scale == 1.0 else 2,
            attention_head_dim=64 if scale == 1.0 else 16,
            num_layers=20 if scale == 1.0 else 2,
            embedding_dim=clip,
            num_embeddings=MAX_LENGTH,
        ),
        "decoder": {
            **DECODER_CONFIG,
            "block_out_channels": block,
            "attention_head_dim": head,
            "cross_attention_dim": _narrow(1536, scale, head),
            "layers_per_block": 3 if scale == 1.0 else 1,
        },
        "text_proj": dict(
            clip_embeddings_dim=clip,
            time_embed_dim=4 * block[0],
            cross_attention_dim=_narrow(1536, scale, head),
        ),
        "super_res": {
            **SUPER_RES_CONFIG,
            "block_out_channels": block,
            "layers_per_block": 3 if scale == 1.0 else 1,
        },
        "text_encoder": text,
    }


def make_karlo_size_model(
    directory: str | Path, dtype: str = "float16", scale: float = 1.0, seed: int = 0, init_device: str = "cpu"
) -> Path:
    """Writes a random-weight model in the Karlo layout with Karlo's architectures into `directory`.

    `init_device`: where the random weights are drawn (3.5 G parameters take minutes on a CPU, seconds on a
    GPU); the values differ between devices, which no timing depends on."""
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from unclip.tiny import _write_tokenizer

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    configs = karlo_configs(scale)
    weights = getattr(torch, dtype)
    vocab_size, bos_id, eos_id = _write_tokenizer(root / "tokenizer", MAX_LENGTH)

    def save(model: torch.nn.Module, name: str) -> None:
        model.to(weights).save_pretrained(root / name)

    with torch.random.fork_rng(devices=[]), torch.device(init_device):
        torch.manual_seed(seed)
        text = CLIPTextConfig(
            **configs["text_encoder"],
            projection_dim=configs["prior"]["embedding_dim"],
            vocab_size=vocab_size,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        save(CLIPTextModelWithProjection(text), "text_encoder")
        prior = PriorTransformer(**configs["prior"])
        with torch.no_grad():  # Karlo stores CLIP's statistics here; zeros would make every sample the mean
            prior.clip_std.fill_(1.0)
        save(prior, "prior")
        save(UnCLIPTextProjModel(**configs["text_proj"]), "text_proj")
        save(UNet2DConditionModel(**configs["decoder"]), "decoder")
        save(UNet2DModel(**configs["super_res"]), "super_res_first")
        save(UNet2DModel(**configs["super_res"]), "super_res_last")
    UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample_range=5.0,
    ).save_pretrained(root / "prior_scheduler")
    UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon").save_pretrained(
        root / "decoder_scheduler"
    )
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon").save_pretrained(
        root / "super_res_scheduler"
    )
    (root / "karlo_size.json").write_text(
        json.dumps({"scale": scale, "dtype": dtype, "seed": seed, "init_device": init_device})
    )
    return root


def main(argv: list[str] | None = None) -> None:
    from benchmarks import throughput
    from benchmarks.common import own_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", default="/tmp/karlo-size", help="where the model is written (reused if there)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="< 1: narrower widths (CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", default="25,25,7")
    parser.add_argument("--baseline-batches", default="1,4,8")
    parser.add_argument(
        "--compile",
        default="",
        choices=["", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile the stages' UNets in this mode (reduce-overhead: CUDA graphs per batch size)",
    )
    parser.add_argument("--max-batch-size", type=int, default=None, help="the stages' UNCLIP_MAX_BATCH_SIZE")
    args = parser.parse_args(argv)
    if args.compile:  # read by the stages at load (unclip.models); the in-process side stays eager
        os.environ["UNCLIP_COMPILE"] = "1"
        os.environ["UNCLIP_COMPILE_MODE"] = "" if args.compile == "default" else args.compile
    own_session()
    folder = Path(args.dir)
    if not (folder / "karlo_size.json").is_file():
        make_karlo_size_model(folder, args.dtype, args.scale, init_device=args.device)
    throughput.main(
        [
            "--model", str(folder), "--device", args.device, "--dtype", args.dtype,
            "--clients", args.clients, "--seconds", str(args.seconds), "--steps", args.steps,
            "--baseline-batches", args.baseline_batches,
            *(["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []),
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
