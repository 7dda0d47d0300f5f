"""What every filter is: something that scores a prompt or images against named categories.

A filter never decides an action: it reports scores, the policy (services/safety/policy.py) turns them into
block / withhold / flag. A filter that cannot answer raises; the engine then fails closed or open as the
policy says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Score:
    """One score of one item (the prompt, or one image) in one category."""

    category: str  # the policy category this score is about
    score: float  # the filter's raw score, recorded in the audit log, never sent to callers
    threshold: float | None = None  # the filter's own threshold (a concept's); None: the category's threshold
    detail: str = ""  # audit only: which term, concept or label produced the score
    action: str | None = None  # the filter's own action, used for categories the policy does not list


@dataclass
class CheckInput:
    """What a check is about. Exactly one of `prompt` / `images` is set."""

    stage: str  # "prompt" | "input_image" | "decoder_output" | "final_output"
    prompt: str | None = None
    images: np.ndarray | None = None  # float32 [n, 3, S, S] in [-1, 1]
    image_embeds: np.ndarray | None = None  # float32 [n, D] CLIP image embeddings, when the caller sent them
    context: dict[str, str] = field(default_factory=dict)  # request_id, user, identity (for external filters)
    deadline: float | None = None  # time.monotonic() by which the answer is due (external calls use it)

    @property
    def count(self) -> int:
        return 1 if self.images is None else int(self.images.shape[0])


class SpecError(ValueError):
    """A filter's policy entry is invalid; `key` is the offending key in it (the loader adds the line)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class FilterError(Exception):
    """A filter could not score (unreachable, timed out, model failed): the policy's failure mode applies."""


class Filter:
    """Base class: subclasses set `type` and `accepts`, implement `check` (and `close`, to free resources)."""

    type: ClassVar[str]  # the `type:` of the filter in the policy
    accepts: ClassVar[frozenset[str]]  # "text" and/or "images"
    # The keys its policy entry may have, besides the common ones (type, fail_open, thresholds).
    spec_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        self.name = name  # its key in the policy's `filters:`
        self.spec = spec

    def check(self, item: CheckInput) -> list[list[Score]]:
        """Scores per item: one list for a prompt, one per image. Raises FilterError when it cannot score."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Runs once before the service says SERVING (a model's first call is slow)."""

    def close(self) -> None:
        """Releases what the filter holds (channels, models) when a policy reload drops it."""
