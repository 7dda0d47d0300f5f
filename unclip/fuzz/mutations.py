"""Hostile variants of a request: structure-aware (every kind of protobuf field out of range, hostile images
in upload fields) or on the wire (truncated, bit-flipped, wrong wire types, random bytes)."""

from __future__ import annotations

import io
import math
import random
import struct
import zlib

import numpy as np
import PIL.Image
from google.protobuf import descriptor as d
from google.protobuf.message import Message

from unclip.fuzz.contracts import Method


def _image(mode: str, fmt: str, side: int = 32, height: int | None = None, seed: int = 0) -> bytes:
    rgb = PIL.Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (height or side, side, 3), dtype=np.uint8)
    )
    try:
        image = rgb.convert(mode)
    except ValueError:
        image = PIL.Image.new(mode, (side, height or side))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(side: int = 4096) -> bytes:
    """A ~100-byte PNG whose header claims side x side."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))


def hostile_images() -> list[bytes]:
    """The upload fields' hostile values (the same bytes every time, so a run replays from its seed)."""
    noise = random.Random(0)
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[:16, :16, 3] = 0
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    valid = _image("RGB", "PNG")
    return [
        png_bomb(4096),
        png_bomb(65535),
        _image("CMYK", "JPEG"),
        _image("CMYK", "TIFF"),
        _image("YCbCr", "TIFF"),
        _image("LAB", "TIFF"),
        _image("F", "TIFF"),
        _image("I;16", "PNG"),
        _image("P", "GIF"),
        _image("RGB", "PNG", 48, 32),  # not square
        _image("RGB", "PNG", 2049),  # over the side limit
        buffer.getvalue(),
        valid[: len(valid) // 2],  # truncated
        b"GIF89a" + noise.randbytes(64),
        noise.randbytes(256),
        b"",
    ]


_INT_EXTREMES = {
    d.FieldDescriptor.TYPE_INT32: [0, -1, 1, 11, 1001, 2**31 - 1, -(2**31)],
    d.FieldDescriptor.TYPE_SINT32: [0, -1, 2**31 - 1, -(2**31)],
    d.FieldDescriptor.TYPE_UINT32: [0, 1, 2**32 - 1],
    d.FieldDescriptor.TYPE_INT64: [0, -1, 1, 1001, 2**62 + 1, 2**63 - 1, -(2**63)],
    d.FieldDescriptor.TYPE_SINT64: [0, -1, 2**63 - 1, -(2**63)],
    d.FieldDescriptor.TYPE_UINT64: [0, 1, 2**64 - 1],
}
_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30, -1e-30, 3.4e38]
_STRINGS = ["", "x" * 257, "y" * 1001, "a\nb\r\x1b[2K\x00", "\u202e\u200b\ufeff", "\U0001f600" * 300, " "]


class Mutator:
    """Makes hostile variants of a seed request, structure-aware (from its descriptor) or on the wire."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.images = hostile_images()

    def request(self, method: Method) -> tuple[bytes, str]:
        """(serialized request, what was done to it)."""
        rng = self.rng
        seed = rng.choice(method.seeds) if method.seeds else method.request_type()
        roll = rng.random()
        if roll < 0.08:
            return seed.SerializeToString(), "seed"
        if roll < 0.75:
            message = type(seed)()
            message.CopyFrom(seed)
            done = [self._mutate(message, depth=0) for _ in range(rng.randint(1, 3))]
            return message.SerializeToString(), "fields: " + "; ".join(done)
        return self._wire(seed.SerializeToString())

    # -- structure-aware -------------------------------------------------------------------------------------

    def _mutate(self, message: Message, depth: int) -> str:
        fields = message.DESCRIPTOR.fields
        if not fields:
            return "empty message"
        f = self.rng.choice(fields)
        name = f.name
        if f.is_repeated:
            return f"{name}: " + self._repeated(message, f)
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(message, name)
            if depth < 3 and self.rng.random() < 0.7:
                if not message.HasField(name):
                    sub.SetInParent()
                return f"{name}." + self._mutate(sub, depth + 1)
            message.ClearField(name)
            return f"{name} cleared"
        value = self._scalar(f)
        setattr(message, name, value)
        return f"{name}={_short(value)}"

    def _repeated(self, message: Message, f: d.FieldDescriptor) -> str:
        values = getattr(message, f.name)
        roll = self.rng.random()
        if roll < 0.25:
            message.ClearField(f.name)
            return "cleared"
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if len(values) and roll < 0.6:  # duplicate an element
                copies = self.rng.choice([2, 11, 21])
                element = values[0]
                for _ in range(copies):
                    values.add().CopyFrom(element)
                return f"x{copies}"
            if len(values):
                return "[0]." + self._mutate(values[0], 1)
            values.add()
            return "empty element"
        if roll < 0.6 and len(values):  # mutate one element
            index = self.rng.randrange(len(values))
            values[index] = self._scalar(f)
            return f"[{index}]={_short(values[index])}"
        count = self.rng.choice([1, 2, 9, 11, 40])
        extra = [self._scalar(f) for _ in range(count)]
        values.extend(extra)
        return f"+{count} values"

    def _scalar(self, f: d.FieldDescriptor):
        rng, kind = self.rng, f.type
        if kind in _INT_EXTREMES:
            return rng.choice(_INT_EXTREMES[kind])
        if kind in (d.FieldDescriptor.TYPE_FIXED32, d.FieldDescriptor.TYPE_FIXED64):
            return rng.choice([0, 1, 2**32 - 1])
        if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
            return rng.choice(_FLOATS)
        if kind == d.FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == d.FieldDescriptor.TYPE_ENUM:
            return rng.choice([*[v.number for v in f.enum_type.values], 99, -1, 2**31 - 1])
        if kind == d.FieldDescriptor.TYPE_STRING:
            return rng.choice(_STRINGS)
        # bytes: images where the field carries uploads, else raw data of awkward sizes
        if f.name in ("image", "mask", "images"):
            return rng.choice(self.images)
        if f.name == "state":  # a generator state is 5056 bytes
            return self.rng.randbytes(rng.choice([0, 8, 5055, 5056, 5057]))
        return self.rng.randbytes(rng.choice([0, 1, 3, 16, 4096]))

    # -- on the wire -----------------------------------------------------------------------------------------

    def _wire(self, data: bytes) -> tuple[bytes, str]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.2 and data:
            cut = rng.randrange(len(data))
            return data[:cut], f"truncated at {cut}/{len(data)}"
        if roll < 0.45 and data:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return bytes(flipped), "bit flips"
        if roll < 0.75:
            number = rng.randint(1, 12)
            wire = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])  # 3/4 are groups, 6/7 invalid
            tag = _varint(number << 3 | wire)
            payload = {0: _varint(2**64 - 1), 1: b"\xff" * 8, 2: _varint(2**31) + b"x", 5: b"\xff" * 4}
            return data + tag + payload.get(wire, b""), f"field {number} with wire type {wire}"
        return self.rng.randbytes(rng.choice([1, 7, 64, 512])), "random bytes"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"
