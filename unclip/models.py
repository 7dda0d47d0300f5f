"""Karlo-layout component loading, component by component.

A model is a folder laid out as ``kakaobrain/karlo-v1-alpha`` (one sub-folder per component, each written by
the
component's ``save_pretrained``), plus optional extras:

    tokenizer/ text_encoder/                     encoder stage (CLIP text)
    image_encoder/ feature_extractor/            encoder stage, variations only (optional)
    prior/ prior_scheduler/                      prior stage
    text_proj/ decoder/ decoder_scheduler/       decoder stage
    super_res_first/ super_res_last/ super_res_scheduler/          upsampler stage "super_res"
    super_res_2_first/ super_res_2_last/ super_res_2_scheduler/    upsampler stage "super_res_2" (optional)

Each service loads only the folders its stage needs. ``resolve_model_dir`` is the one place that turns a model
reference (a folder, or ``s3://bucket/prefix`` via ``unclip.storage``) into a local folder; loaders take
folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (
        CLIPImageProcessorPil,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

logger = logging.getLogger(__name__)

# torch, diffusers and transformers are imported inside the loaders: they take seconds to import, and
# processes that only inspect a model folder (the stack launcher, the CLI) need only resolve_model_dir and
# upsampler_stages.


def _diffusers_kwargs() -> dict:
    from diffusers.utils import is_accelerate_available

    # diffusers loads weights lazily only with accelerate installed (and warns on every load without it).
    return {"low_cpu_mem_usage": is_accelerate_available()}


# Upsampler stages in cascade order; each stage's folders are <stage>_first, <stage>_last, <stage>_scheduler.
UPSAMPLER_STAGES = ("super_res", "super_res_2")


class ModelLoadError(RuntimeError):
    """The model folder is missing a component or its components do not fit together."""


# ----------------------------------------------------------------------------------------------------
# Precision (UNCLIP_DTYPE)
# ----------------------------------------------------------------------------------------------------

DTYPES = ("float32", "float16", "bfloat16")  # the weights' precision a model stage may load


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, Arm's BF16 extension), where
    oneDNN's bfloat16 convolutions and matmuls run ~1.5-2x faster than float32 (BENCHMARKS.md). Without it
    oneDNN emulates bfloat16 and is slower than float32."""
    import platform

    import torch

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # aarch64: the BF16 extension
    except (AttributeError, RuntimeError):  # a torch build without these probes: assume none
        return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """UNCLIP_DTYPE=auto: float16 on CUDA, bfloat16 on a CPU with native bfloat16, float32 otherwise."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and native_bfloat16():
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """ "bfloat16" / torch.bfloat16 -> torch.bfloat16; None -> float32; "auto" -> auto_dtype(device);
    ValueError naming dtype otherwise."""
    import torch

    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(device)
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in `value` (a tensor, tuple, list or model output) cast to `dtype`."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):  # diffusers BaseOutput / transformers ModelOutput: both OrderedDicts
        for key in list(value.keys()):
            value[key] = _cast_floats(value[key], dtype)  # their __setitem__ also sets the attribute
        return value
    return value


class LowPrecision:
    """A module whose weights are float16/bfloat16 behind a float32 interface.

    Floating inputs are cast to the weights' dtype on the way in and every floating output back to float32
    on the way out, so the engines' latents, scheduler arithmetic and wire tensors stay float32 (as
    diffusers' pipelines keep the scheduler state in the latents' dtype, this is the safer half-precision
    variant) and the batched stages in unclip/batching need no change. Attributes (config, parameters(),
    post_process_latents, ...) are the module's own.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.module = module  # the half-precision module
        self.dtype = dtype  # its weights' dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        args = _cast_floats(args, self.dtype)
        kwargs = {k: _cast_floats(v, self.dtype) for k, v in kwargs.items()}
        return _cast_floats(self.module(*args, **kwargs), torch.float32)

    def __getattr__(self, name: str) -> Any:  # only called for names not set in __init__
        return getattr(self.module, name)


def resolve_model_dir(model: str | Path) -> Path:
    """Turns a model reference into a local folder holding the Karlo layout.

    A local folder is used in place; ``s3://bucket/prefix`` is fetched into the verified local cache by
    ``unclip.storage.fetch_model`` (configured from the environment) and that folder is returned.
    """
    text = str(model)
    if not text:
        raise ModelLoadError("model must name a model folder, got an empty string")
    if text.startswith("s3://"):
        from unclip import storage  # imported here: only S3-backed deployments need the S3 client

        try:
            return storage.fetch_model(text)
        except (storage.StorageError, ValueError) as error:
            raise ModelLoadError(f"model {text}: {error}") from error
    if "://" in text:
        raise ModelLoadError(f"model {text!r}: only local folders and s3://bucket/prefix are supported")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist or is not a folder")
    return path


def _component_dir(model_dir: Path, folder: str, what: str) -> Path:
    path = model_dir / folder
    if not path.is_dir():
        raise ModelLoadError(f"model folder {model_dir} has no {folder}/ folder ({what})")
    return path


def _move(
    module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None, unet: bool = False
) -> Any:
    """On `device`, in eval mode, frozen; behind a float32 interface (LowPrecision) when not float32.
    `unet`: the decoder's and upsamplers' UNets also take the compute options (`_tune_unet`)."""
    import torch

    module = module.to(device).eval().requires_grad_(False)
    # The stage's log says which precision each module computes in (UNCLIP_DTYPE=auto decides per machine).
    logger.info("weights: %s dtype=%s", type(module).__name__, str(next(module.parameters()).dtype)[6:])
    if unet:
        module = _tune_unet(module)
    if dtype is None or dtype == torch.float32:
        return module  # unchanged: float32 parity with diffusers' reference pipelines
    return LowPrecision(module, dtype)


def _tune_unet(module: torch.nn.Module) -> Any:
    """The UNet with the compute options the environment asks for (UNCLIP_CHANNELS_LAST, on by default;
    UNCLIP_COMPILE, off by default; neither is bit-exact with diffusers' reference: BENCHMARKS.md has what
    each gains on CPU, tests/unit/test_compute_options.py bounds the channels-last drift). Tensors in and
    out keep their layout: a channels-last UNet takes the engines' contiguous latents and answers
    channels-last outputs, which the element-wise scheduler maths accept as they are."""
    import torch

    from unclip.runtime.settings import env_default

    if env_default("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    if env_default("compile"):
        mode = env_default("compile_mode") or None
        if mode is not None:
            # Static shapes, one compiled graph (with "reduce-overhead": one CUDA graph) per batch size the
            # step batcher forms: up to 2 * max_batch_size shapes with guidance.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        module = torch.compile(module, mode=mode, dynamic=False if mode else None)
    # What the module now is (not what was asked): the stage's log says which compute options its UNets run
    # with, which is how `unclip up --channels-last/--compile` can be checked from outside the process.
    kernels = [p for p in module.parameters() if p.dim() == 4]
    channels_last = bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    compiled = hasattr(module, "_orig_mod")  # torch.compile's OptimizedModule wraps the original
    logger.info(
        "compute options: %s channels_last=%s compile=%s",
        type(getattr(module, "_orig_mod", module)).__name__,
        channels_last,
        compiled,
    )
    return module


def _dtype_kwargs(dtype: torch.dtype | None, library: str) -> dict:
    """Loads the weights straight into `dtype` (no float32 copy first); nothing for float32 or None."""
    import torch

    if dtype is None or dtype == torch.float32:
        return {}
    return {"torch_dtype" if library == "diffusers" else "dtype": dtype}


def load_tokenizer(model_dir: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_component_dir(model_dir, "tokenizer", "CLIPTokenizer"))


def load_text_encoder(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextModelWithProjection

    path = _component_dir(model_dir, "text_encoder", "CLIPTextModelWithProjection")
    model = CLIPTextModelWithProjection.from_pretrained(
        path, local_files_only=True, **_dtype_kwargs(dtype, "transformers")
    )
    return _move(model, device, dtype)


def has_image_encoder(model_dir: Path) -> bool:
    """True when the model carries the CLIP image encoder that variations need."""
    return (model_dir / "image_encoder").is_dir() and (model_dir / "feature_extractor").is_dir()


def load_image_encoder(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil]:
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    encoder_path = _component_dir(model_dir, "image_encoder", "CLIPVisionModelWithProjection")
    processor_path = _component_dir(model_dir, "feature_extractor", "CLIPImageProcessor")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        encoder_path, local_files_only=True, **_dtype_kwargs(dtype, "transformers")
    )
    # The PIL backend always: CLIPImageProcessor would switch to torchvision where it is installed, and the
    # preprocessing (hence variations) would differ between deployments.
    return _move(image_encoder, device, dtype), CLIPImageProcessorPil.from_pretrained(processor_path)


def load_scheduler(model_dir: Path, folder: str) -> UnCLIPScheduler:
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler.from_pretrained(_component_dir(model_dir, folder, "UnCLIPScheduler"))


def tokenizer_max_length(model_dir: Path) -> int:
    """The tokenizer's ``model_max_length``, read without building the tokenizer."""
    path = _component_dir(model_dir, "tokenizer", "CLIPTokenizer") / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text())["model_max_length"]
    except (OSError, KeyError, ValueError) as error:
        raise ModelLoadError(f"{path} must set model_max_length: {error}") from error
    return int(value)


def load_prior(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PriorTransformer:
    """The prior, checked against the tokenizer: its text positions must equal the tokenizer's length."""
    from diffusers import PriorTransformer

    prior = PriorTransformer.from_pretrained(
        _component_dir(model_dir, "prior", "PriorTransformer"),
        **_diffusers_kwargs(),
        **_dtype_kwargs(dtype, "diffusers"),
    )
    max_length = tokenizer_max_length(model_dir)
    if prior.config.num_embeddings != max_length:
        raise ModelLoadError(
            f"prior/ num_embeddings ({prior.config.num_embeddings}) must equal the tokenizer's "
            f"model_max_length ({max_length}): the prior attends over exactly one position per text token"
        )
    return _move(prior, device, dtype)


def load_text_proj(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> UnCLIPTextProjModel:
    # UnCLIPTextProjModel only exists in diffusers' deprecated unclip package; diffusers is pinned exactly.
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    path = _component_dir(model_dir, "text_proj", "UnCLIPTextProjModel")
    model = UnCLIPTextProjModel.from_pretrained(
        path, **_diffusers_kwargs(), **_dtype_kwargs(dtype, "diffusers")
    )
    return _move(model, device, dtype)


def load_decoder(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    path = _component_dir(model_dir, "decoder", "UNet2DConditionModel")
    model = UNet2DConditionModel.from_pretrained(
        path, **_diffusers_kwargs(), **_dtype_kwargs(dtype, "diffusers")
    )
    return _move(model, device, dtype, unet=True)


def upsampler_stages(model_dir: Path) -> list[str]:
    """The upsampler stages present, in cascade order: ``super_res``, then ``super_res_2`` if its folders
    exist.

    A stage counts only if all three of its folders exist, and ``super_res_2`` only after ``super_res``.
    """
    stages = []
    for stage in UPSAMPLER_STAGES:
        folders = (f"{stage}_first", f"{stage}_last", f"{stage}_scheduler")
        if not all((model_dir / folder).is_dir() for folder in folders):
            break
        stages.append(stage)
    return stages


def load_super_res(
    model_dir: Path,
    stage: str = "super_res",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[UNet2DModel, UNet2DModel, UnCLIPScheduler]:
    """One upsampler stage: (first UNet for all but the last step, last UNet for the last step, scheduler)."""
    from diffusers import UNet2DModel

    if stage not in UPSAMPLER_STAGES:
        raise ModelLoadError(f"stage must be one of {', '.join(UPSAMPLER_STAGES)}, got {stage!r}")
    first = UNet2DModel.from_pretrained(
        _component_dir(model_dir, f"{stage}_first", "UNet2DModel"),
        **_diffusers_kwargs(),
        **_dtype_kwargs(dtype, "diffusers"),
    )
    last = UNet2DModel.from_pretrained(
        _component_dir(model_dir, f"{stage}_last", "UNet2DModel"),
        **_diffusers_kwargs(),
        **_dtype_kwargs(dtype, "diffusers"),
    )
    scheduler = load_scheduler(model_dir, f"{stage}_scheduler")
    if first.config.sample_size != last.config.sample_size:
        raise ModelLoadError(f"{stage}_first and {stage}_last must have the same sample_size")
    return _move(first, device, dtype, unet=True), _move(last, device, dtype, unet=True), scheduler


def stage_input_size(model_dir: Path, stage: str) -> int:
    """The image size an upsampler stage receives: the previous stage's output size (0 if unknown).

    Read from the previous stage's config only, so an upsampler service never loads the decoder's weights.
    """
    index = UPSAMPLER_STAGES.index(stage)
    previous = "decoder" if index == 0 else f"{UPSAMPLER_STAGES[index - 1]}_first"
    config = model_dir / previous / "config.json"
    if not config.is_file():
        return 0
    return int(json.loads(config.read_text())["sample_size"])
