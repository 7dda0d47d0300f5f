"""Model-backed image filter: diffusers' StableDiffusionSafetyChecker weights, from a path in the policy.

Policy entry:
    sd_checker:
      type: sd_safety_checker
      path: /models/safety_checker    # StableDiffusionSafetyChecker.save_pretrained folder
      feature_extractor: /models/fe   # CLIPImageProcessor folder (default: <path>/../feature_extractor)
      category: sexual
The score is the checker's largest concept score (cosine similarity minus the concept's threshold, with
diffusers' special-care adjustment, as in its forward_onnx); the checker flags an image when it is above 0, so
that is this filter's threshold unless the policy's `thresholds:` says otherwise.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from services.safety.filters.base import CheckInput, Filter, Score, SpecError


class SdSafetyCheckerFilter(Filter):
    type = "sd_safety_checker"
    accepts = frozenset({"images"})
    spec_keys = frozenset({"path", "feature_extractor", "category"})

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        super().__init__(name, spec, policy_dir)
        path = spec.get("path")
        if not isinstance(path, str):
            raise SpecError(
                "path", "an sd_safety_checker needs `path:` to saved StableDiffusionSafetyChecker weights"
            )
        path = os.path.join(policy_dir, path)
        extractor = os.path.join(
            policy_dir, spec.get("feature_extractor") or os.path.join(path, "..", "feature_extractor")
        )
        for key, folder in (("path", path), ("feature_extractor", extractor)):
            if not os.path.isdir(folder):
                raise SpecError(key, f"{os.path.normpath(folder)} is not a folder")
        self.category = str(spec.get("category", "sexual"))

        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self.checker = StableDiffusionSafetyChecker.from_pretrained(path).eval()
            self.processor = CLIPImageProcessor.from_pretrained(extractor)
        except (OSError, ValueError) as error:
            raise SpecError("path", f"cannot load the safety checker: {error}") from error
        self._torch = torch
        self._lock = threading.Lock()

    def concept_scores(self, images: np.ndarray):
        """The largest concept score per image ([n]); > 0 is what diffusers calls an NSFW concept."""
        torch = self._torch
        pixels = ((np.clip(images.transpose(0, 2, 3, 1), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        clip_input = self.processor(images=list(pixels), return_tensors="pt").pixel_values
        checker = self.checker
        with self._lock, torch.inference_mode():
            # diffusers' StableDiffusionSafetyChecker.forward_onnx, stopping before it blacks images out.
            pooled = checker.vision_model(clip_input)[1]
            image_embeds = checker.visual_projection(pooled)
            special_cos = _cosine(image_embeds, checker.special_care_embeds)
            cos = _cosine(image_embeds, checker.concept_embeds)
            special_scores = special_cos - checker.special_care_embeds_weights
            special_care = torch.any(special_scores > 0, dim=1)
            adjustment = (special_care * 0.01).unsqueeze(1).expand(-1, cos.shape[1])
            concept_scores = (cos - checker.concept_embeds_weights) + adjustment  # [n, concepts]
            return concept_scores.max(dim=1).values.float().numpy()

    def check(self, item: CheckInput) -> list[list[Score]]:
        scores = self.concept_scores(item.images)  # type: ignore[arg-type]
        # Strictly above 0 flags in diffusers; the smallest float above 0 makes ">= threshold" the same test.
        threshold = float(np.nextafter(np.float32(0), np.float32(1)))
        return [[Score(self.category, float(s), threshold, "sd_safety_checker")] for s in scores]

    def warmup(self) -> None:
        size = (
            self.processor.crop_size.get("height", 224) if isinstance(self.processor.crop_size, dict) else 224
        )
        self.concept_scores(np.zeros((1, 3, size, size), np.float32))


def _cosine(a, b):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T
