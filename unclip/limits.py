"""The one table of request limits and sampling defaults.

The orchestrator, the stages, the CLI and the HTTP gateway all read a limit from here; nothing else writes a
limit's number. Import-free (no torch, no grpc) so every front door can use it. docs/interfaces.md prints it
(`python -m unclip.limits`).

A `Limit` is an inclusive range with the field it bounds (the public API's name) and why it has that value.
`check(name, value, field=...)` raises ValueError naming the field, which every servicer maps to
INVALID_ARGUMENT (CLI exit 2, HTTP 400 with `param`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    name: str  # key in LIMITS
    field: str  # the request field it bounds, as the public API names it
    low: int | float  # smallest allowed value (inclusive)
    high: int | float  # largest allowed value (inclusive)
    why: str  # one line: where the value comes from


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in [
        Limit("n", "n", 1, 10, "images per request, as the OpenAI Images API for dall-e-2"),
        Limit(
            "prompt_chars", "prompt", 1, 1000, "characters of a prompt, as the OpenAI Images API for dall-e-2"
        ),
        Limit("user_chars", "user", 0, 256, "characters of the end-user id, as the OpenAI API"),
        Limit("seed", "seed", 0, 2**63 - 1, "a torch.Generator seed (int64, non-negative)"),
        Limit(
            "steps",
            "num_inference_steps",
            2,
            1000,
            "denoising steps of one stage (UnCLIPScheduler divides by steps - 1; 1000 is the trained grid)",
        ),
        Limit(
            "prior_candidates",
            "prior_num_candidates",
            1,
            16,
            "prior samples reranked by CLIP similarity (1: no rerank)",
        ),
        Limit(
            "frames",
            "frames",
            2,
            32,
            "frames of an interpolation (4 stage calls of at most 10 rows)",
        ),
    ]
}


def check(name: str, value: object, field: str | None = None) -> int | float:
    """`value` if it is a number (not a bool) within LIMITS[name]; else ValueError naming `field`."""
    limit = LIMITS[name]
    field = field or limit.field
    integral = isinstance(limit.low, int) and isinstance(limit.high, int)
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{field} must be {'an integer' if integral else 'a number'}, got {value!r}")
    if not limit.low <= value <= limit.high:
        raise ValueError(f"{field} must be in {limit.low}..{limit.high}, got {value!r}")
    return value


def table() -> str:
    """The table as Markdown (docs/interfaces.md)."""
    rows = ["| limit | field | range | why |", "|---|---|---|---|"]
    for limit in LIMITS.values():
        rows.append(f"| `{limit.name}` | `{limit.field}` | {limit.low}..{limit.high} | {limit.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
