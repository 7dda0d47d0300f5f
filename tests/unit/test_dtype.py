"""UNCLIP_DTYPE: the model stages load their weights in float16/bfloat16 behind a float32 interface.

On CPU with bfloat16 (CPU supports it): a tiny model's components load in bfloat16, the engine chain (and the
step-batched decoder the services run) takes and returns float32 and gives finite images in [-1, 1] close to
float32's; a bad value is refused naming the setting (flag and variable) and the engine argument.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from services.decoder.engine import DecoderEngine, UpsamplerEngine
from services.encoder.engine import EncoderEngine
from services.prior.engine import PriorEngine
from unclip.batching.batcher import BatcherConfig, StepBatcher
from unclip.batching.stages import stage_for
from unclip.models import LowPrecision, parse_dtype
from unclip.rng import generators_from_seed

# bfloat16 keeps 8 bits of mantissa (~4e-3 relative per op). The tiny random UNets saturate: most pixels
# sit at +-1 after clamping, and the few whose unclamped value is near 0 can flip sign (measured: mean drift
# 0.034, 1.7% of values off by more than 0.1, all of them by ~2). So "close" is: small mean drift and almost
# every value within 0.1; loose on purpose (the float32 path is held to 1e-4 by the parity tests).
MEAN_TOLERANCE = 0.1
CLOSE = 0.1  # per-value closeness
CLOSE_FRACTION = 0.95  # of the values at least this fraction must be CLOSE
EMBED_TOLERANCE = 0.25  # embeddings are not clamped, so no flips: max abs drift


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (actual - expected).abs()
    assert diff.mean().item() < MEAN_TOLERANCE, diff.mean().item()
    close = (diff <= CLOSE).float().mean().item()
    assert close >= CLOSE_FRACTION, close


@pytest.fixture(scope="module")
def engines_bf16(tiny_model_dir, engines):
    # type(engines): the float32 fixture's own container (conftest's Engines)
    return type(engines)(
        encoder=EncoderEngine.from_pretrained(tiny_model_dir, dtype="bfloat16"),
        prior=PriorEngine.from_pretrained(tiny_model_dir, dtype="bfloat16"),
        decoder=DecoderEngine.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
        upsamplers=[UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res", dtype="bfloat16")],
    )


def test_components_load_in_bfloat16(engines_bf16):
    modules = {
        "text_encoder": engines_bf16.encoder.text_encoder,
        "image_encoder": engines_bf16.encoder.image_encoder,
        "prior": engines_bf16.prior.prior,
        "text_proj": engines_bf16.decoder.text_proj,
        "decoder": engines_bf16.decoder.decoder,
        "super_res_first": engines_bf16.upsamplers[0].first,
        "super_res_last": engines_bf16.upsamplers[0].last,
    }
    for name, module in modules.items():
        assert isinstance(module, LowPrecision), name
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)


def test_float32_loads_the_plain_modules(engines):
    # float32 (the default) is untouched: no wrapper, float32 weights, so parity with diffusers is unchanged.
    assert isinstance(engines.decoder.decoder, torch.nn.Module)
    assert {p.dtype for p in engines.decoder.decoder.parameters()} == {torch.float32}


def test_bfloat16_chain_is_float32_on_the_wire_and_close(engines, engines_bf16, chain):
    expected = chain.run_text_to_image(engines, ["a red circle", "a blue square"], seed=3)
    actual = chain.run_text_to_image(engines_bf16, ["a red circle", "a blue square"], seed=3)
    for key in ("image_embeds", "decoder", "super_res"):
        assert actual[key].dtype == torch.float32, key  # what goes on the wire
        assert actual[key].shape == expected[key].shape, key
        assert torch.isfinite(actual[key]).all(), key
    images = actual["images"]
    assert images.min() >= -1 and images.max() <= 1
    assert_close(images, expected["images"])
    drift = (actual["image_embeds"] - expected["image_embeds"]).abs().max().item()
    assert drift < EMBED_TOLERANCE, drift
    # bfloat16 really ran: the result is not bit-identical to float32.
    assert drift > 0


def test_bfloat16_image_encoder_returns_float32(engines, engines_bf16):
    import PIL.Image

    image = PIL.Image.new("RGB", (32, 32), (200, 30, 30))
    embeds = engines_bf16.encoder.encode_image([image])
    assert embeds.dtype == torch.float32
    assert (embeds - engines.encoder.encode_image([image])).abs().max().item() < EMBED_TOLERANCE


def test_step_batched_decoder_in_bfloat16(engines_bf16):
    """The services' default path (unclip.batching) drives the modules directly; it too stays float32."""
    decoder = engines_bf16.decoder
    text = engines_bf16.encoder.encode_text(["a red circle"], True)
    torch.manual_seed(0)
    kwargs = dict(
        image_embeds=torch.randn(1, decoder.image_embed_dim),
        text_embeds=text.text_embeds,
        text_encoder_hidden_states=text.text_encoder_hidden_states,
        text_mask=text.text_mask,
        num_inference_steps=2,
    )
    alone = decoder.decode(generators=generators_from_seed(5, 1), **kwargs)
    stage = stage_for(decoder)
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=8, max_queue_delay_s=0.0))
    try:
        batched = batcher.submit(stage.start(generators=generators_from_seed(5, 1), **kwargs)).result(
            timeout=120
        )
    finally:
        batcher.close()
    assert batched.images.dtype == torch.float32
    assert torch.isfinite(batched.images).all()
    assert_close(batched.images, alone.images)


def cpu_flags() -> set[str]:
    """The kernel's view of this CPU's features (independent of torch's own probes)."""
    for line in open("/proc/cpuinfo"):
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86 Linux")
def test_auto_picks_bfloat16_where_the_cpu_multiplies_it_natively():
    """UNCLIP_DTYPE=auto (the services' default): bfloat16 on a CPU with AVX512-BF16 or AMX (oneDNN runs the
    UNets' convolutions ~1.5-2x faster there, BENCHMARKS.md), float32 on one without (emulated bfloat16 is
    slower than float32); float16 on CUDA whatever the CPU."""
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert parse_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("auto", "cpu") == parse_dtype("auto")
    assert parse_dtype("auto", "cuda") == torch.float16
    assert parse_dtype("auto", torch.device("cuda", 0)) == torch.float16


def test_bad_dtype_is_refused_naming_it(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16"):
        PriorEngine.from_pretrained(tiny_model_dir, dtype="float64")
    assert parse_dtype("float16") == torch.float16
    assert parse_dtype(None) == torch.float32

    # A model stage refuses to start, naming the variable / the flag (before loading anything).
    env = {**os.environ, "UNCLIP_DTYPE": "float64"}
    run = [sys.executable, "-m", "services.prior", "--model", str(tiny_model_dir), "--port", "0"]
    by_env = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert by_env.returncode != 0
    assert "UNCLIP_DTYPE='float64' is not valid" in by_env.stderr
    env.pop("UNCLIP_DTYPE")
    by_flag = subprocess.run([*run, "--dtype", "fp8"], env=env, capture_output=True, text=True, timeout=120)
    assert by_flag.returncode == 2
    assert "--dtype" in by_flag.stderr and "UNCLIP_DTYPE" in by_flag.stderr
