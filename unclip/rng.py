"""The per-image generator contract.

Image i of a request with seed s owns ``torch.Generator("cpu").manual_seed(s + i)``. Every stage draws from
it in
the order diffusers' ``UnCLIPPipeline`` draws from a list of generators: prior initial noise, each prior
step's
noise, decoder initial noise, each decoder step's noise, then each upsampler stage's initial noise and steps.
Between stages (and processes) a generator travels as its state: ``torch.Generator.get_state()`` bytes.

Drawing per image (never one draw for the whole batch) is what makes image i depend only on its own seed, so a
request can be split, retried or batched differently and still draw the same noise.
"""

from __future__ import annotations

import hashlib

import torch

from unclip.limits import LIMITS

# torch's CPU generator (mt19937) state: 624 words of state + bookkeeping, serialised as 5056 bytes.
GENERATOR_STATE_BYTES = 5056

# The largest seed a request may carry (seeds are int64 on the wire; seed + i must stay representable).
MAX_SEED = int(LIMITS["seed"].high)

# The most images one request may ask for (n), checked by every stage so each is callable on its own.
MAX_IMAGES = int(LIMITS["n"].high)


def generators_from_seed(seed: int, n: int) -> list[torch.Generator]:
    """Returns the n per-image generators of a request: image i gets ``manual_seed(seed + i)``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must be in 1..{MAX_IMAGES}, got {n!r}")
    # manual_seed takes the seed modulo 2**64; seed + i never exceeds 2**63 + 8, so no two images collide.
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def generator_to_bytes(generator: torch.Generator) -> bytes:
    """The generator's full state, as it travels in ``GeneratorState.state``."""
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generators must be CPU torch.Generator objects, got {generator!r}")
    return bytes(generator.get_state().numpy().tobytes())


def generator_from_bytes(data: bytes, field: str = "generators") -> torch.Generator:
    """Rebuilds a generator from ``generator_to_bytes`` output; ValueError naming ``field`` if malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{field} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != GENERATOR_STATE_BYTES:
        raise ValueError(
            f"{field} state must be {GENERATOR_STATE_BYTES} bytes (a torch CPU generator), got {len(data)}"
        )
    generator = torch.Generator("cpu")
    try:
        generator.set_state(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as error:  # torch rejects states whose bookkeeping fields are inconsistent
        raise ValueError(f"{field} state is not a valid torch generator state: {error}") from error
    return generator


def randn_per_image(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` whose row r is drawn from ``generators[r]``.

    Identical to diffusers' ``randn_tensor(shape, generator=<list>)``: rows are drawn one after another on
    the CPU
    (where the generators live), then moved to ``device``.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"generators must have one entry per row ({shape[0]}), got {len(generators)}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device="cpu", dtype=dtype) for g in generators]
    return torch.cat(rows, dim=0).to(device)


def derive_generator(generator: torch.Generator, index: int) -> torch.Generator:
    """A new generator seeded from ``generator``'s current state and ``index``, without advancing
    ``generator``.

    For extra independent streams that must not disturb the image's own draws (the prior's rerank candidates).
    """
    digest = hashlib.sha256(generator_to_bytes(generator) + index.to_bytes(8, "little")).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little"))
