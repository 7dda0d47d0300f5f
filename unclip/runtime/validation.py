"""Range checks shared by the orchestrator and the stages (each stage is callable on its own); the numbers
are unclip.limits'."""

from __future__ import annotations

import math

from unclip.limits import LIMITS
from unclip.rng import MAX_IMAGES, MAX_SEED

MAX_PROMPT_CHARS = int(LIMITS["prompt_chars"].high)


def check_steps(value: int, field: str) -> None:
    steps = LIMITS["steps"]
    if not steps.low <= value <= steps.high:
        raise ValueError(f"{field} must be in {steps.low}..{steps.high}, got {value}")


def check_candidates(value: int, field: str, unset_means_one: bool = False) -> None:
    """Prior rerank candidates; ``unset_means_one``: 0 (a stage request's unset field) means 1."""
    candidates = LIMITS["prior_candidates"]
    low = 0 if unset_means_one else candidates.low
    if not low <= value <= candidates.high:
        raise ValueError(f"{field} must be in {low}..{candidates.high}, got {value}")


def check_guidance(value: float, field: str) -> None:
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {value}")


def check_n(value: int, field: str = "n") -> None:
    if not 1 <= value <= MAX_IMAGES:
        raise ValueError(f"{field} must be in 1..{MAX_IMAGES}, got {value}")


def check_seed(value: int, field: str = "seed") -> None:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{field} must be in 0..{MAX_SEED}, got {value}")


def check_prompt(prompt: str, field: str = "prompt") -> None:
    if not prompt or not prompt.strip():
        raise ValueError(f"{field} is required (got an empty prompt)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} is {len(prompt)} characters, over {MAX_PROMPT_CHARS}")
