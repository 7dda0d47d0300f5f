"""The encoder stage: CLIP text encoding (and CLIP image encoding for variations), torch only.

Text encoding reproduces ``UnCLIPPipeline._encode_prompt`` exactly: the prompts are encoded as one batch, the
unconditional ("") prompts as a second batch, and with classifier-free guidance the result is stacked
[unconditional; conditional], so rows [0, n) are unconditional and rows [n, 2n) are the prompts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from unclip import models
from unclip.limits import LIMITS
from unclip.rng import MAX_IMAGES
from unclip.runtime.images import decode_image

logger = logging.getLogger(__name__)

# Longest prompt accepted, in characters (the tokenizer truncates far earlier; this bounds the work per
# request).
MAX_PROMPT_CHARS = int(LIMITS["prompt_chars"].high)


@dataclass
class EncoderOutput:
    text_embeds: (
        torch.Tensor
    )  # float32 [B, D] pooled projected; B = 2n with guidance, rows [0, n) unconditional
    text_encoder_hidden_states: torch.Tensor  # float32 [B, L, H] last hidden states, L = max_tokens
    text_mask: torch.Tensor  # bool [B, L] attention mask (True = a real token)
    truncated: list[bool]  # per prompt (n): True when the prompt was cut at max_tokens


def load_image(data: bytes, field: str = "images") -> PIL.Image.Image:
    """Decodes an image file (PNG, JPEG, WebP, ...) to RGB; ValueError naming ``field`` if it is not one
    (the upload checks of unclip.runtime.images.decode_image: size, format, header dimensions, mode)."""
    return decode_image(bytes(data), field).convert("RGB")


class EncoderEngine:
    """CLIP text encoder + tokenizer, and (when the model has them) the CLIP image encoder + its processor."""

    def __init__(self, tokenizer, text_encoder, image_encoder=None, feature_extractor=None, device="cpu"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        # The longest token sequence (prompt tokens + BOS/EOS) the text encoder sees; longer prompts are
        # truncated.
        self.max_tokens: int = int(tokenizer.model_max_length)
        # transformers sets truncation/padding on the shared Rust tokenizer before each call, so two threads
        # can interleave those settings (tokenizers' "Already borrowed"); tokenizing takes microseconds.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
    ) -> EncoderEngine:
        """`dtype`: the weights' precision (auto, float32, float16 or bfloat16; see models.parse_dtype).
        Tensors in and out stay float32 whatever it is."""
        dtype = models.parse_dtype(dtype, device)
        model_dir = models.resolve_model_dir(model_dir)
        image_encoder = feature_extractor = None
        if models.has_image_encoder(model_dir):
            image_encoder, feature_extractor = models.load_image_encoder(model_dir, device, dtype)
        return cls(
            tokenizer=models.load_tokenizer(model_dir),
            text_encoder=models.load_text_encoder(model_dir, device, dtype),
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            device=device,
        )

    @property
    def has_image_encoder(self) -> bool:
        return self.image_encoder is not None

    # text

    def _check_prompts(self, prompts: list[str]) -> None:
        if not isinstance(prompts, list | tuple) or not 1 <= len(prompts) <= MAX_IMAGES:
            count = len(prompts) if isinstance(prompts, list | tuple) else type(prompts).__name__
            raise ValueError(f"prompts must be a list of 1..{MAX_IMAGES} prompts, got {count}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
            # "" is allowed: it is the prompt of image variations (and the unconditional branch).
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompts[{i}] is {len(prompt)} characters, over {MAX_PROMPT_CHARS}")

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One batch through the text encoder, padded to max_tokens, as the reference tokenizes it.
        with self._tokenizer_lock:
            text_inputs = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_tokens,
                truncation=True,
                return_tensors="pt",
            )
        text_mask = text_inputs.attention_mask.bool().to(self.device)
        output = self.text_encoder(text_inputs.input_ids.to(self.device))
        return output.text_embeds, output.last_hidden_state, text_mask

    @torch.no_grad()
    def encode_text(self, prompts: list[str], do_classifier_free_guidance: bool) -> EncoderOutput:
        """Encodes n prompts; with guidance also n "" prompts, stacked first (rows [0, n) unconditional)."""
        self._check_prompts(prompts)
        prompts = list(prompts)

        # 1. Which prompts the tokenizer cuts (tokens beyond max_tokens, counting BOS and EOS).
        with self._tokenizer_lock:
            lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False).input_ids]
        truncated = [length > self.max_tokens for length in lengths]
        if any(truncated):
            logger.info(
                "truncated %d of %d prompts to %d tokens", sum(truncated), len(prompts), self.max_tokens
            )

        # 2. The prompts, then the unconditional prompts, each as its own batch (as the reference does).
        text_embeds, hidden_states, text_mask = self._encode(prompts)
        if do_classifier_free_guidance:
            uncond_embeds, uncond_hidden_states, uncond_mask = self._encode([""] * len(prompts))
            text_embeds = torch.cat([uncond_embeds, text_embeds])  # [2n, D]
            hidden_states = torch.cat([uncond_hidden_states, hidden_states])  # [2n, L, H]
            text_mask = torch.cat([uncond_mask, text_mask])  # [2n, L]

        return EncoderOutput(
            text_embeds=text_embeds.float().cpu(),
            text_encoder_hidden_states=hidden_states.float().cpu(),
            text_mask=text_mask.cpu(),
            truncated=truncated,
        )

    @torch.no_grad()
    def encode_text_batch(
        self, requests: list[list[str]], do_classifier_free_guidance: bool
    ) -> list[EncoderOutput]:
        """encode_text for several requests in one forward pass (dynamic batching): their prompts as one
        batch, then as many "" prompts as a second batch, as encode_text does for one request. A single
        request gives exactly encode_text's result; several share kernels, so rounding can differ slightly."""
        for prompts in requests:
            self._check_prompts(prompts)
        merged = [p for prompts in requests for p in prompts]
        with self._tokenizer_lock:
            lengths = [len(ids) for ids in self.tokenizer(merged, verbose=False).input_ids]
        text_embeds, hidden_states, text_mask = self._encode(merged)
        if do_classifier_free_guidance:
            uncond = self._encode([""] * len(merged))
        outputs, start = [], 0
        for prompts in requests:
            rows = slice(start, start + len(prompts))
            start += len(prompts)
            parts = [text_embeds[rows], hidden_states[rows], text_mask[rows]]
            if do_classifier_free_guidance:  # [unconditional; conditional], rows [0, n) unconditional
                parts = [torch.cat([u[rows], c]) for u, c in zip(uncond, parts, strict=True)]
            outputs.append(
                EncoderOutput(
                    text_embeds=parts[0].float().cpu(),
                    text_encoder_hidden_states=parts[1].float().cpu(),
                    text_mask=parts[2].cpu(),
                    truncated=[length > self.max_tokens for length in lengths[rows]],
                )
            )
        return outputs

    # images

    @torch.no_grad()
    def encode_image(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """CLIP image embeddings [N, D] of square images, as ``UnCLIPImageVariationPipeline._encode_image``
        computes them."""
        if self.image_encoder is None:
            raise ValueError(
                "images cannot be encoded: this model has no image_encoder/ (variations unsupported)"
            )
        if not isinstance(images, list | tuple) or not 1 <= len(images) <= MAX_IMAGES:
            count = len(images) if isinstance(images, list | tuple) else type(images).__name__
            raise ValueError(f"images must be a list of 1..{MAX_IMAGES} images, got {count}")
        for i, image in enumerate(images):
            if not isinstance(image, PIL.Image.Image):
                raise ValueError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
            if image.width != image.height:
                raise ValueError(f"images[{i}] must be square, got {image.width}x{image.height}")
        dtype = next(self.image_encoder.parameters()).dtype
        # The same image object given k times (a variation's n copies) is preprocessed once: preprocessing is
        # per image, so the pixel values are the same as processing each copy, without k full-size arrays.
        unique = list({id(image): image for image in images}.values())
        row = {id(image): i for i, image in enumerate(unique)}
        processed = self.feature_extractor(images=unique, return_tensors="pt").pixel_values
        pixel_values = processed[[row[id(image)] for image in images]]
        image_embeds = self.image_encoder(pixel_values.to(device=self.device, dtype=dtype)).image_embeds
        return image_embeds.float().cpu()  # [N, D]

    def warmup(self) -> None:
        """One small forward pass of each loaded encoder, so the first request does not pay for lazy init."""
        self.encode_text(["warmup"], do_classifier_free_guidance=True)
        if self.image_encoder is not None:
            self.encode_image([PIL.Image.new("RGB", (64, 64))])
