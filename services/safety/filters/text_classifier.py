"""Model-backed text filter: a transformers sequence-classification model loaded from a path in the policy.

Policy entry:
    toxicity:
      type: text_classifier
      path: /models/toxic-bert    # a folder save_pretrained wrote (model + tokenizer), relative to the policy
      labels: {toxic: harassment, threat: violence}   # model label -> policy category; others are ignored
      max_length: 256
Scores are the label probabilities (softmax; sigmoid when the model's problem_type is multi-label).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from services.safety.filters.base import CheckInput, Filter, Score, SpecError


class TextClassifierFilter(Filter):
    type = "text_classifier"
    accepts = frozenset({"text"})
    spec_keys = frozenset({"path", "labels", "max_length"})

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        super().__init__(name, spec, policy_dir)
        path = spec.get("path")
        if not isinstance(path, str):
            raise SpecError("path", "a text_classifier needs `path:` to a saved transformers model")
        path = os.path.join(policy_dir, path)
        if not os.path.isdir(path):
            raise SpecError("path", f"{path} is not a folder")
        labels = spec.get("labels")
        if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
            raise SpecError("labels", "must map model labels to policy categories")
        self.max_length = int(spec.get("max_length", 256))

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as error:
            raise SpecError(
                "path", f"cannot load a text-classification model from {path}: {error}"
            ) from error
        id2label = self.model.config.id2label
        known = set(id2label.values())
        for label in labels:
            if str(label) not in known:
                raise SpecError(
                    f"labels.{label}", f"the model has no label {label!r} (it has {sorted(known)})"
                )
        self.labels = {i: labels[lab] for i, lab in id2label.items() if lab in labels}  # index -> category
        self.label_names = dict(id2label)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self._torch = torch
        self._lock = threading.Lock()  # one forward at a time: the service runs torch with one thread

    def _probabilities(self, texts: list[str]):
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch = self.tokenizer(
                texts, return_tensors="pt", truncation=True, max_length=self.max_length, padding=True
            )
            logits = self.model(**batch).logits  # [n, num_labels]
            return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def check(self, item: CheckInput) -> list[list[Score]]:
        probs = self._probabilities([item.prompt or ""])[0]
        return [
            [
                Score(category, float(probs[i]), None, f"label:{self.label_names[i]}")
                for i, category in self.labels.items()
            ]
        ]

    def warmup(self) -> None:
        self._probabilities(["warm-up"])
