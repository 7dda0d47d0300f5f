"""Range checks shared by the orchestrator and the stages (each stage is callable on its own)."""

from __future__ import annotations

import math

from unclip.rng import MAX_IMAGES, MAX_SEED

MIN_STEPS, MAX_STEPS = 2, 1000  # UnCLIPScheduler cannot take a single step
MAX_PROMPT_CHARS = 1000


def check_steps(value: int, field: str) -> None:
    if not MIN_STEPS <= value <= MAX_STEPS:
        raise ValueError(f"{field} must be in {MIN_STEPS}..{MAX_STEPS}, got {value}")


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
