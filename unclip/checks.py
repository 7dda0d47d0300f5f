"""Input checks the engines share. Every error is a ValueError whose message starts with the field's name
(the proto field's name), so servicers can map it to INVALID_ARGUMENT as is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from unclip.limits import LIMITS
from unclip.rng import MAX_IMAGES


def check_steps(value: int, field: str = "num_inference_steps") -> int:
    steps = LIMITS["steps"]
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not steps.low <= value <= steps.high
    ):
        raise ValueError(f"{field} must be in {steps.low}..{steps.high}, got {value!r}")
    return int(value)


def check_guidance(value: float, field: str = "guidance_scale") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {value}")
    return value


def check_flag(value: bool, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be a bool, got {type(value).__name__}")
    return value


def check_callback(value: Callable[[int, int], None] | None, field: str = "step_callback") -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{field} must be callable, got {type(value).__name__}")


def check_generators(generators: Sequence[torch.Generator], field: str = "generators") -> int:
    """One CPU generator per image, 1..MAX_IMAGES of them; returns n."""
    if not isinstance(generators, list | tuple) or not 1 <= len(generators) <= MAX_IMAGES:
        count = len(generators) if isinstance(generators, list | tuple) else type(generators).__name__
        raise ValueError(f"{field} must hold 1..{MAX_IMAGES} generators (one per image), got {count}")
    for i, generator in enumerate(generators):
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"{field}[{i}] must be a CPU torch.Generator, got {generator!r}")
    return len(generators)


def check_tensor(
    tensor: torch.Tensor,
    field: str,
    shape: Sequence[int | None],
    dtype: torch.dtype = torch.float32,
    *,
    finite: bool = True,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Checks type, dtype, shape (None matches any size), finiteness and optionally the value range."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{field} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise ValueError(f"{field} must be {str(dtype).removeprefix('torch.')}, got {str(tensor.dtype)[6:]}")
    dims = list(tensor.shape)
    if len(dims) != len(shape) or any(
        want is not None and want != got for want, got in zip(shape, dims, strict=True)
    ):
        expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
        raise ValueError(f"{field} must have shape {expected}, got {dims}")
    if any(d == 0 for d in dims):
        raise ValueError(f"{field} must not be empty, got shape {dims}")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{field} must not contain NaN or Inf")
    if value_range is not None and tensor.is_floating_point():
        low, high = value_range
        if bool((tensor < low).any()) or bool((tensor > high).any()):
            raise ValueError(f"{field} values must be in [{low:g}, {high:g}]")
    return tensor


def check_count(
    generators: Sequence[torch.Generator], tensor: torch.Tensor, field: str, rows_per_image: int
) -> None:
    """Names ``generators`` when their count disagrees with the batch of an otherwise well-formed tensor."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return  # check_tensor reports it
    rows = tensor.shape[0]
    if rows % rows_per_image == 0 and rows // rows_per_image != len(generators):
        raise ValueError(
            f"generators must hold one generator per image: {field} has {rows // rows_per_image} images"
            f" ({rows} rows), got {len(generators)} generators"
        )
