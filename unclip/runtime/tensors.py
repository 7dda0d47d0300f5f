"""proto Tensor <-> torch.Tensor: raw little-endian bytes with a dtype and a shape (the KServe v2 / Triton
way).

Decoding validates everything a caller can get wrong and names the field in the ValueError:
a missing tensor, an unknown dtype, a rank or dimension out of bounds (unclip.limits), a byte count that
does not match the shape (computed without overflow), the wrong dtype or rank or
size, NaN / Inf where finite values are required.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from unclip.limits import LIMITS
from unclip.rng import MAX_IMAGES, generator_from_bytes, generator_to_bytes
from unclip.v1 import tensor_pb2

_TO_TORCH = {
    tensor_pb2.DATA_TYPE_FLOAT32: torch.float32,
    tensor_pb2.DATA_TYPE_FLOAT16: torch.float16,
    tensor_pb2.DATA_TYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DATA_TYPE_INT64: torch.int64,
    tensor_pb2.DATA_TYPE_INT32: torch.int32,
    tensor_pb2.DATA_TYPE_UINT8: torch.uint8,
    tensor_pb2.DATA_TYPE_BOOL: torch.bool,
}
_TO_PROTO = {v: k for k, v in _TO_TORCH.items()}

assert sys.byteorder == "little", "the wire format is little-endian"


def dtype_name(dtype: int) -> str:
    return tensor_pb2.DataType.Name(dtype) if dtype in tensor_pb2.DataType.values() else str(dtype)


def to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encodes a CPU copy of `tensor` (one memcpy)."""
    if tensor.dtype not in _TO_PROTO:
        raise TypeError(f"no wire dtype for {tensor.dtype}")
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw 16-bit words
        data = tensor.view(torch.int16).numpy().tobytes()
    else:
        data = tensor.numpy().tobytes()
    return tensor_pb2.Tensor(dtype=_TO_PROTO[tensor.dtype], shape=list(tensor.shape), data=data)


def from_proto(
    message: tensor_pb2.Tensor | None,
    field: str,
    *,
    dtype: torch.dtype | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Decodes a Tensor field, checking it.

    Args:
        message: the field's value (None or an empty Tensor count as missing).
        field: the field's name, used in every error message.
        dtype: the dtype it must have.
        shape: the shape it must have; None entries match any size (e.g. [None, 3, None, None]).
        finite: reject NaN and Inf.
    """
    if message is None or (message.dtype == tensor_pb2.DATA_TYPE_UNSPECIFIED and not message.shape):
        raise ValueError(f"{field} is required")
    if message.dtype not in _TO_TORCH:
        raise ValueError(f"{field}: unsupported dtype {dtype_name(message.dtype)}")
    torch_dtype = _TO_TORCH[message.dtype]
    if dtype is not None and torch_dtype != dtype:
        raise ValueError(f"{field} must be {dtype_name(_TO_PROTO[dtype])}, got {dtype_name(message.dtype)}")
    dims = list(message.shape)
    check_shape(dims, field)
    if shape is not None:
        if len(dims) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, dims, strict=True)
        ):
            expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
            raise ValueError(f"{field} must have shape {expected}, got {dims}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected_bytes = math.prod(dims) * itemsize  # Python integers: no int64 overflow (prod([]) is 1)
    if len(message.data) != expected_bytes:
        raise ValueError(
            f"{field}: {len(message.data)} bytes do not match shape {dims} of {dtype_name(message.dtype)}"
        )
    if torch_dtype == torch.bfloat16:
        array = np.frombuffer(message.data, dtype=np.int16).copy()
        tensor = torch.from_numpy(array).view(torch.bfloat16).reshape(dims)
    else:
        np_dtype = torch.empty((), dtype=torch_dtype).numpy().dtype
        tensor = torch.from_numpy(np.frombuffer(message.data, dtype=np_dtype).copy()).reshape(dims)
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{field} contains NaN or Inf")
    return tensor


def check_shape(dims: Sequence[int], field: str) -> None:
    """Rank and every dimension within unclip.limits ("tensor_rank", "tensor_dim"), before any size is
    computed from them: a shape like [2**62 + 1, 4] is refused here, whatever bytes come with it."""
    rank, dim = LIMITS["tensor_rank"], LIMITS["tensor_dim"]
    if len(dims) > rank.high:
        raise ValueError(f"{field}: shape has {len(dims)} dimensions, over {rank.high}")
    for d in dims:
        if not dim.low <= d <= dim.high:
            raise ValueError(f"{field}: dimension {d} of shape {list(dims)} is outside {dim.low}..{dim.high}")


def from_field(request: object, field: str, *, prefix: str = "", **checks: object) -> torch.Tensor:
    """Decodes `request.<field>` (a Tensor message field) with from_proto's checks; missing -> ValueError.

    `prefix` names the enclosing message in errors (e.g. "inpaint." gives "inpaint.mask is required").
    """
    message = getattr(request, field) if request.HasField(field) else None  # type: ignore[attr-defined]
    return from_proto(message, prefix + field, **checks)  # type: ignore[arg-type]


def decode_generators(states, n: int, field: str = "generators") -> list[torch.Generator]:
    """The per-image generator states of a request: exactly n, each a valid torch CPU generator state."""
    if len(states) != n:
        raise ValueError(f"{field} must hold one state per image ({n}), got {len(states)}")
    return [generator_from_bytes(s.state, f"{field}[{i}]") for i, s in enumerate(states)]


def encode_generators(generators: list[torch.Generator]) -> list[tensor_pb2.GeneratorState]:
    return [tensor_pb2.GeneratorState(state=generator_to_bytes(g)) for g in generators]


def decode_text_condition(request, n: int | None, cfg: bool):
    """text_embeds [B, D], text_encoder_hidden_states [B, L, H], text_mask bool [B, L]; B = 2n with guidance.

    With n None (the prior: n is the rows of the text), n is derived from B.
    """
    text_embeds = from_field(request, "text_embeds", dtype=torch.float32, shape=[None, None], finite=True)
    rows = text_embeds.shape[0]
    if n is None:
        if cfg and rows % 2:
            raise ValueError(f"text_embeds must have 2n rows with guidance (unconditional first), got {rows}")
        n = rows // 2 if cfg else rows
    expected = 2 * n if cfg else n
    if rows != expected or not 1 <= n <= MAX_IMAGES:
        raise ValueError(
            f"text_embeds must have {'2n' if cfg else 'n'} rows for n in 1..{MAX_IMAGES}, got {rows}"
        )
    hidden = from_field(
        request, "text_encoder_hidden_states", dtype=torch.float32, shape=[rows, None, None], finite=True
    )
    mask = from_field(request, "text_mask", dtype=torch.bool, shape=[rows, hidden.shape[1]])
    return n, text_embeds, hidden, mask
