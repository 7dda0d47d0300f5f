"""A structure-aware fuzzer for a running stack, written from the contracts (the protos).

Every method of every service a process serves (found in the descriptors, so a new RPC is fuzzed the day it
is added) gets requests made from a valid seed: the seeds are captured from the real chain at warm-up
(encoder -> prior -> decoder -> upsamplers, safety), then mutated:

- fields: every kind of protobuf field set out of range (integer extremes, NaN/Inf, unknown enum values,
  strings over their limit or full of control characters, repeated fields emptied or multiplied, messages
  cleared), tensors with overflowing or mismatched shapes, generator states of the wrong size;
- hostile images in upload fields: a decompression bomb, CMYK/LAB/float modes, truncated, non-square,
  random bytes;
- the wire: truncated, bit-flipped, a known field sent with the wrong wire type, random bytes;
- calls: deadlines of a few milliseconds, cancellation mid-call and mid-stream.

The invariant (`ALLOWED`): every answer is OK or a documented code, never INTERNAL or UNKNOWN; no process
dies; each process's RSS after the run is at most `rss_factor` x its RSS after warm-up. `channel_for(name)`
is the one way the fuzzer reaches a process ("orchestrator", "encoder", "super_res", ...): tests pass the
shared stack's `stack.channel`, so credentials attach there.
"""

from __future__ import annotations

import io
import math
import os
import random
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import PIL.Image
from google.protobuf import descriptor as d
from google.protobuf.message import Message

# Every code a request may legitimately end with: bad input, backpressure, the caller's own deadline or
# cancellation, a health check for a service that is not there.
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.NOT_FOUND,
    }
)
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
# The services each process of a stack serves (replicas share their stage's name before "#").
SERVICES = {
    "orchestrator": ["unclip.v1.ImageService"],
    "encoder": ["unclip.v1.Encoder"],
    "prior": ["unclip.v1.Prior"],
    "decoder": ["unclip.v1.Decoder"],
    "super_res": ["unclip.v1.Upsampler"],
    "super_res_2": ["unclip.v1.Upsampler"],
    "safety": ["unclip.v1.Safety"],
}
MB = 1024 * 1024


@dataclass
class Method:
    process: str  # which process serves it ("super_res", ...)
    path: str  # "/unclip.v1.Prior/Sample"
    request_type: type[Message]
    server_streaming: bool
    client_streaming: bool
    seeds: list[Message] = field(default_factory=list)  # valid requests captured at warm-up


@dataclass
class Report:
    requests: int = 0
    codes: Counter = field(default_factory=Counter)  # (path, code name) -> count
    failures: list[str] = field(default_factory=list)  # one line per disallowed answer (first 50 kept)
    failure_count: int = 0
    deaths: list[str] = field(default_factory=list)
    rss_warm_mb: dict[str, float] = field(default_factory=dict)
    rss_after_mb: dict[str, float] = field(default_factory=dict)
    rss_peak_mb: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    warm_up_seconds: float = 0.0
    not_served: set[str] = field(default_factory=set)  # methods in the protos that the server leaves out

    def rss_ratio(self) -> dict[str, float]:
        return {
            p: self.rss_after_mb[p] / self.rss_warm_mb[p] for p in self.rss_after_mb if self.rss_warm_mb[p]
        }

    def summary(self) -> dict:
        by_code = Counter()
        for (_, code), count in self.codes.items():
            by_code[code] += count
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "warm_up_seconds": round(self.warm_up_seconds, 1),
            "not_served": sorted(self.not_served),
            "codes": dict(by_code),
            "failures": self.failure_count,
            "failure_examples": self.failures[:10],
            "deaths": self.deaths,
            "rss_warm_mb": {k: round(v) for k, v in self.rss_warm_mb.items()},
            "rss_peak_mb": {k: round(v) for k, v in self.rss_peak_mb.items()},
            "rss_after_mb": {k: round(v) for k, v in self.rss_after_mb.items()},
            "rss_ratio": {k: round(v, 3) for k, v in self.rss_ratio().items()},
        }


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return 0.0
    return 0.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] not in "ZX"  # a zombie has exited
    except FileNotFoundError:
        return False


def discover(processes: list[str]) -> list[Method]:
    """Every method of every service of these processes (and their health and reflection services)."""
    from google.protobuf import descriptor_pool
    from google.protobuf.message_factory import GetMessageClass
    from grpc_health.v1 import health_pb2  # noqa: F401 (registers the descriptors)
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401

    import unclip.v1.decoder_pb2  # noqa: F401
    import unclip.v1.encoder_pb2  # noqa: F401
    import unclip.v1.orchestrator_pb2  # noqa: F401
    import unclip.v1.prior_pb2  # noqa: F401
    import unclip.v1.safety_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    methods = []
    for process in processes:
        for name in [*SERVICES[process.split("#")[0]], HEALTH, REFLECTION]:
            service = pool.FindServiceByName(name)
            for method in service.methods:
                methods.append(
                    Method(
                        process=process,
                        path=f"/{name}/{method.name}",
                        request_type=GetMessageClass(method.input_type),
                        server_streaming=method.server_streaming,
                        client_streaming=method.client_streaming,
                    )
                )
    return methods


# ---- hostile values ---------------------------------------------------------------------------------------


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
        b"GIF89a" + os.urandom(64),
        os.urandom(256),
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
            return os.urandom(rng.choice([0, 8, 5055, 5056, 5057]))
        return os.urandom(rng.choice([0, 1, 3, 16, 4096]))

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
        return os.urandom(rng.choice([1, 7, 64, 512])), "random bytes"


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


# ---- seeds: valid requests from the real chain ------------------------------------------------------------


def capture_seeds(methods: list[Method], channel_for: Callable[[str], grpc.Channel]) -> None:
    """Fills each method's seeds with valid requests, made by running the chain once stage by stage."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from unclip.rng import generators_from_seed
    from unclip.runtime.tensors import encode_generators
    from unclip.v1 import (
        decoder_pb2,
        decoder_pb2_grpc,
        encoder_pb2,
        encoder_pb2_grpc,
        orchestrator_pb2,
        prior_pb2,
        prior_pb2_grpc,
        safety_pb2,
    )

    processes = {m.process for m in methods}
    png = _image("RGB", "PNG")
    rgba = hostile_images()[11]
    fast = orchestrator_pb2.SamplingParams(
        prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
    )
    seeds: dict[str, list[Message]] = {
        "/unclip.v1.ImageService/Generate": [
            orchestrator_pb2.GenerateRequest(prompt="a blue square", n=1, size=48, seed=2, params=fast),
            orchestrator_pb2.GenerateRequest(prompt="a red circle", n=2, size=32, seed=1, params=fast),
        ],
        "/unclip.v1.ImageService/CreateVariation": [
            orchestrator_pb2.VariationRequest(image=png, n=1, size=32, seed=1, params=fast)
        ],
        "/unclip.v1.ImageService/Edit": [
            orchestrator_pb2.EditRequest(image=rgba, prompt="a star", n=1, size=32, seed=1, params=fast)
        ],
        "/unclip.v1.Encoder/EncodeImage": [encoder_pb2.EncodeImageRequest(images=[png])],
        f"/{HEALTH}/Check": [health_pb2.HealthCheckRequest(service="")],
        f"/{HEALTH}/Watch": [health_pb2.HealthCheckRequest(service="")],
        f"/{REFLECTION}/ServerReflectionInfo": [reflection_pb2.ServerReflectionRequest(list_services="")],
    }
    seeds["/unclip.v1.ImageService/GenerateStream"] = seeds["/unclip.v1.ImageService/Generate"]
    context = safety_pb2.RequestContext(request_id="fuzz-seed", user="fuzz")
    seeds["/unclip.v1.Safety/CheckPrompt"] = [
        safety_pb2.CheckPromptRequest(prompt="a red circle", context=context)
    ]
    text_request = encoder_pb2.EncodeTextRequest(prompts=["a red circle"], do_classifier_free_guidance=True)
    seeds["/unclip.v1.Encoder/EncodeText"] = [text_request]
    if {"encoder", "prior", "decoder"} <= processes:
        text = encoder_pb2_grpc.EncoderStub(channel_for("encoder")).EncodeText(text_request, timeout=60)
        prior_request = prior_pb2.PriorRequest(
            text_embeds=text.text_embeds,
            text_encoder_hidden_states=text.text_encoder_hidden_states,
            text_mask=text.text_mask,
            generators=encode_generators(generators_from_seed(0, 1)),
            num_inference_steps=2,
            guidance_scale=4.0,
            do_classifier_free_guidance=True,
        )
        prior = prior_pb2_grpc.PriorStub(channel_for("prior")).Sample(prior_request, timeout=60)
        decode_request = decoder_pb2.DecodeRequest(
            image_embeds=prior.image_embeds,
            text_embeds=text.text_embeds,
            text_encoder_hidden_states=text.text_encoder_hidden_states,
            text_mask=text.text_mask,
            generators=prior.generators,
            num_inference_steps=2,
            guidance_scale=8.0,
            do_classifier_free_guidance=True,
        )
        decoded = decoder_pb2_grpc.DecoderStub(channel_for("decoder")).Decode(decode_request, timeout=60)
        seeds["/unclip.v1.Prior/Sample"] = seeds["/unclip.v1.Prior/SampleStream"] = [prior_request]
        seeds["/unclip.v1.Decoder/Decode"] = seeds["/unclip.v1.Decoder/DecodeStream"] = [decode_request]
        seeds["/unclip.v1.Safety/CheckImages"] = [
            safety_pb2.CheckImagesRequest(
                images=decoded.images, stage=safety_pb2.CHECK_STAGE_DECODER_OUTPUT, context=context
            )
        ]
        images, generators = decoded.images, decoded.generators
        for stage in ("super_res", "super_res_2"):
            if stage not in processes:
                break
            request = decoder_pb2.UpsampleRequest(images=images, generators=generators, num_inference_steps=2)
            out = decoder_pb2_grpc.UpsamplerStub(channel_for(stage)).Upsample(request, timeout=60)
            seeds[f"{stage}:/unclip.v1.Upsampler/Upsample"] = [request]
            seeds[f"{stage}:/unclip.v1.Upsampler/UpsampleStream"] = [request]
            images, generators = out.images, out.generators
    for method in methods:
        method.seeds = seeds.get(f"{method.process}:{method.path}") or seeds.get(method.path) or []


# ---- the run ----------------------------------------------------------------------------------------------


class Fuzzer:
    """Sends mutated requests to every method from `concurrency` threads; see the module docstring."""

    def __init__(
        self,
        channel_for: Callable[[str], grpc.Channel],
        pids: dict[str, int],
        *,
        seed: int = 0,
        concurrency: int = 3,
        timeout_s: float = 20.0,
    ):
        self.channel_for = channel_for
        self.pids = pids  # process name -> pid, for liveness and RSS
        self.methods = discover([name for name in pids if name.split("#")[0] in SERVICES])
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.timeout_s = timeout_s  # deadline of every call that is not a short-deadline case
        self.report = Report()
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, process: str) -> grpc.Channel:
        with self._lock:
            if process not in self._channels:
                self._channels[process] = self.channel_for(process)
            return self._channels[process]

    def warm_up(self) -> None:
        """Captures seeds and sends each seed once; then records every process's RSS."""
        started = time.monotonic()
        capture_seeds(self.methods, self._channel)
        captured = {"/unclip.v1.Encoder/EncodeText", "/unclip.v1.Prior/Sample", "/unclip.v1.Decoder/Decode"}
        for method in list(self.methods):
            if method.path in captured or method.path.endswith("Stream") or "Upsample" in method.path:
                continue  # capture_seeds called it (or its unary twin) already
            for seed in method.seeds[:1] or [method.request_type()]:
                self._call(method, seed.SerializeToString(), "warm-up", self.timeout_s, cancel_after=None)
            if self.report.codes[(method.path, "UNIMPLEMENTED")]:  # in the proto, not served (Health.List)
                self.methods.remove(method)
                self.report.not_served.add(method.path)
        failed = [line for line in self.report.failures if "-> UNIMPLEMENTED" not in line]
        if failed:
            raise AssertionError("seed requests failed:\n" + "\n".join(failed))
        self.report.rss_warm_mb = {name: rss_mb(pid) for name, pid in self.pids.items()}
        self.report.codes.clear()
        self.report.requests = self.report.failure_count = 0
        self.report.failures.clear()
        self.report.warm_up_seconds = time.monotonic() - started

    def run(self, *, requests: int | None = None, seconds: float | None = None) -> Report:
        """Sends until `requests` are done or `seconds` have passed, whichever first."""
        started = time.monotonic()
        stop = threading.Event()
        budget = [requests if requests is not None else math.inf]
        peaks = {name: self.report.rss_peak_mb.get(name, 0.0) for name in self.pids}  # over every run

        def worker(index: int) -> None:
            rng = random.Random(self.rng.random() + index)
            mutator = Mutator(rng)
            while not stop.is_set():
                with self._lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                if seconds is not None and time.monotonic() - started > seconds:
                    return
                self._one(rng, mutator)

        def sample() -> None:
            while not stop.wait(0.25):
                for name, pid in self.pids.items():
                    peaks[name] = max(peaks[name], rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in [pool.submit(worker, i) for i in range(self.concurrency)]:
                future.result()
        stop.set()
        sampler.join()
        self.report.seconds = time.monotonic() - started
        self.report.rss_peak_mb = peaks
        self.report.deaths = [name for name, pid in self.pids.items() if not alive(pid)]
        return self.report

    def settle(self, rss_factor: float, wait_s: float = 15.0) -> None:
        """Records RSS after the run, waiting up to `wait_s` for the processes' periodic trim to bring each
        within `rss_factor` x warm-up."""
        deadline = time.monotonic() + wait_s
        while True:
            after = {name: rss_mb(pid) for name, pid in self.pids.items()}
            within = all(after[n] <= rss_factor * self.report.rss_warm_mb[n] for n in after)
            if within or time.monotonic() > deadline:
                self.report.rss_after_mb = after
                return
            time.sleep(0.5)

    def _one(self, rng: random.Random, mutator: Mutator) -> None:
        # The product's methods three times as often as each process's health and reflection methods.
        method = rng.choices(self.methods, [1 if m.path.startswith("/grpc.") else 3 for m in self.methods])[0]
        roll = rng.random()
        if roll < 0.07 and method.seeds:  # a valid request with a deadline of a few milliseconds
            timeout = rng.choice([0.001, 0.005, 0.02, 0.1])
            self._call(
                method, rng.choice(method.seeds).SerializeToString(), f"deadline {timeout}s", timeout, None
            )
        elif roll < 0.14 and method.seeds:  # a valid request cancelled mid-call / mid-stream
            self._call(
                method,
                rng.choice(method.seeds).SerializeToString(),
                "cancelled",
                self.timeout_s,
                cancel_after=rng.choice([0, 1, 2]),
            )
        else:
            data, what = mutator.request(method)
            self._call(method, data, what, self.timeout_s, cancel_after=None)

    def _call(self, method: Method, data: bytes, what: str, timeout: float, cancel_after: int | None) -> None:
        channel = self._channel(method.process)
        code, details = grpc.StatusCode.OK, ""
        try:
            if method.client_streaming and method.server_streaming:
                call = channel.stream_stream(method.path)(iter([data]), timeout=timeout)
                code, details = _drain(call, cancel_after if cancel_after is not None else 1)
            elif method.server_streaming:
                call = channel.unary_stream(method.path)(data, timeout=timeout)
                limit = cancel_after if cancel_after is not None else (1 if "Watch" in method.path else None)
                code, details = _drain(call, limit)
            elif cancel_after is not None:
                future = channel.unary_unary(method.path).future(data, timeout=timeout)
                time.sleep(0.01 * cancel_after)
                future.cancel()
                try:
                    future.result()
                except grpc.FutureCancelledError:
                    code = grpc.StatusCode.CANCELLED
            else:
                channel.unary_unary(method.path)(data, timeout=timeout)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        self._record(method, what, code, details)

    def _record(self, method: Method, what: str, code: grpc.StatusCode, details: str) -> None:
        with self._lock:
            self.report.requests += 1
            self.report.codes[(method.path, code.name)] += 1
            if code not in ALLOWED:
                self.report.failure_count += 1
                if len(self.report.failures) < 50:
                    self.report.failures.append(
                        f"{method.process} {method.path} [{what}] -> {code.name}: {details[:300]}"
                    )


def _drain(call, limit: int | None) -> tuple[grpc.StatusCode, str]:
    """Reads a stream's events, cancelling after `limit` of them (None: to the end)."""
    received = 0
    try:
        if limit == 0:
            call.cancel()
            return grpc.StatusCode.CANCELLED, ""
        for _ in call:
            received += 1
            if limit is not None and received >= limit:
                call.cancel()
                return grpc.StatusCode.CANCELLED, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
