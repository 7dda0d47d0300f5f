"""CLIP concepts: cosine similarity between a CLIP embedding and concept embeddings, a threshold per concept.

The mechanism of diffusers' StableDiffusionSafetyChecker (cosine distance to concept embeddings against
per-concept thresholds), with concepts and thresholds from the policy, so it works with whichever CLIP the
deployment loads.

Policy entry:
    concepts:
      type: clip_concepts
      encoder_addr: 127.0.0.1:50052   # optional; default: the policy's encoder_addr
      timeout_seconds: 5
      concepts:
        - {name: gore, category: violence, text: "a photo of gore", threshold: 0.28}
        - {name: pinned, category: sexual, embedding: [0.1, -0.3, ...], threshold: 0.3}
A concept is either `text` (embedded by the encoder service's CLIP text encoder, once, on first use) or an
`embedding` (a list of floats in the same CLIP space). Prompts are embedded by the encoder service; images use
the CLIP image embeddings the caller sent (CheckImagesRequest.image_embeds), or are embedded by the encoder
service.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from services.safety.filters.base import CheckInput, Filter, FilterError, Score, SpecError
from unclip.runtime.server import stage_channel
from unclip.v1 import encoder_pb2, encoder_pb2_grpc


@dataclass
class _Concept:
    name: str
    category: str
    threshold: float | None  # None: the category's threshold
    text: str | None
    embedding: np.ndarray | None  # [D], unit length once known


class ClipConceptsFilter(Filter):
    type = "clip_concepts"
    accepts = frozenset({"text", "images"})
    spec_keys = frozenset({"concepts", "encoder_addr", "timeout_seconds"})

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        super().__init__(name, spec, policy_dir)
        items = spec.get("concepts")
        if not isinstance(items, list) or not items:
            raise SpecError("concepts", "a clip_concepts filter needs a list of concepts")
        self.concepts: list[_Concept] = []
        for i, entry in enumerate(items):
            key = f"concepts.{i}"
            if not isinstance(entry, dict):
                raise SpecError(
                    key, "a concept is a mapping with name, category, text or embedding, threshold"
                )
            unknown = set(entry) - {"name", "category", "text", "embedding", "threshold"}
            if unknown:
                raise SpecError(key, f"unknown key {sorted(unknown)[0]!r}")
            if not isinstance(entry.get("category"), str):
                raise SpecError(key, "category is required")
            threshold = entry.get("threshold")
            if threshold is not None and (
                isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            ):
                raise SpecError(f"{key}.threshold", "must be a number (a cosine similarity)")
            text, embedding = entry.get("text"), entry.get("embedding")
            if (text is None) == (embedding is None):
                raise SpecError(key, "give exactly one of `text` and `embedding`")
            vector = None
            if embedding is not None:
                try:
                    vector = np.asarray(embedding, dtype=np.float32)
                except (TypeError, ValueError) as error:
                    raise SpecError(f"{key}.embedding", "must be a list of numbers") from error
                if vector.ndim != 1 or not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
                    raise SpecError(f"{key}.embedding", "must be a non-zero finite list of numbers")
                vector = vector / np.linalg.norm(vector)
            self.concepts.append(
                _Concept(str(entry.get("name", f"{name}[{i}]")), entry["category"], threshold, text, vector)
            )
        self.encoder_addr = spec.get("encoder_addr") or None
        self.timeout = float(spec.get("timeout_seconds", 5.0))
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def bind(self, encoder_addr: str | None) -> None:
        """The policy's encoder address, used when the entry names none."""
        self.encoder_addr = self.encoder_addr or encoder_addr

    # --- the encoder service --------------------------------------------------------------------------------
    def _encoder(self) -> encoder_pb2_grpc.EncoderStub:
        if not self.encoder_addr:
            raise FilterError("no encoder_addr in the policy: cannot embed text or images")
        with self._lock:
            if self._channel is None:
                self._channel = stage_channel(self.encoder_addr)  # mTLS when the stack has it
        return encoder_pb2_grpc.EncoderStub(self._channel)

    def _timeout(self, item: CheckInput | None) -> float:
        if item is None or item.deadline is None:
            return self.timeout
        return max(0.001, min(self.timeout, item.deadline - time.monotonic()))

    def _embed_text(self, texts: list[str], item: CheckInput | None) -> np.ndarray:
        try:
            reply = self._encoder().EncodeText(
                encoder_pb2.EncodeTextRequest(prompts=texts, do_classifier_free_guidance=False),
                timeout=self._timeout(item),
            )
        except grpc.RpcError as error:
            raise FilterError(
                f"encoder {self.encoder_addr}: {error.code().name}: {error.details()}"
            ) from error
        return _array(reply.text_embeds)

    def _embed_images(self, images: np.ndarray, item: CheckInput) -> np.ndarray:
        from PIL import Image

        files = []
        for image in images:  # [3, S, S] in [-1, 1] -> PNG
            pixels = ((np.clip(image.transpose(1, 2, 0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            files.append(buffer.getvalue())
        try:
            reply = self._encoder().EncodeImage(
                encoder_pb2.EncodeImageRequest(images=files), timeout=self._timeout(item)
            )
        except grpc.RpcError as error:
            raise FilterError(
                f"encoder {self.encoder_addr}: {error.code().name}: {error.details()}"
            ) from error
        return _array(reply.image_embeds)

    def _concept_matrix(self, item: CheckInput | None) -> np.ndarray:
        missing = [c for c in self.concepts if c.embedding is None]
        if missing:
            vectors = self._embed_text([c.text for c in missing], item)  # type: ignore[misc]
            for concept, vector in zip(missing, vectors, strict=True):
                concept.embedding = vector / max(np.linalg.norm(vector), 1e-12)
        return np.stack([c.embedding for c in self.concepts])  # type: ignore[misc]

    # --- scoring --------------------------------------------------------------------------------------------
    def check(self, item: CheckInput) -> list[list[Score]]:
        if item.prompt is not None:
            embeds = self._embed_text([item.prompt], item)
        elif item.image_embeds is not None:
            embeds = item.image_embeds
        else:
            embeds = self._embed_images(item.images, item)  # type: ignore[arg-type]
        concepts = self._concept_matrix(item)  # [C, D]
        if embeds.shape[-1] != concepts.shape[-1]:
            raise FilterError(
                f"embedding size {embeds.shape[-1]} does not match the concepts' {concepts.shape[-1]} "
                "(another CLIP?)"
            )
        norms = np.linalg.norm(embeds, axis=-1, keepdims=True)
        similarity = (embeds / np.maximum(norms, 1e-12)) @ concepts.T  # [n, C] cosine similarity
        return [
            [
                Score(c.category, float(row[j]), c.threshold, f"concept:{c.name}")
                for j, c in enumerate(self.concepts)
            ]
            for row in similarity
        ]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def _array(tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=np.float32).reshape(list(tensor.shape))
