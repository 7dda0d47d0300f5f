"""Real engines on a tiny random model (built once per session), and their text conditioning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the machine's cores are shared; also keeps float rounding stable between runs

from services.decoder.engine import DecoderEngine, UpsamplerEngine  # noqa: E402
from services.encoder.engine import EncoderEngine  # noqa: E402
from services.prior.engine import PriorEngine  # noqa: E402
from unclip.tiny import make_tiny_model  # noqa: E402


@dataclass
class Engines:
    encoder: EncoderEngine
    prior: PriorEngine
    decoder: DecoderEngine
    upsampler: UpsamplerEngine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", variation=False)


@pytest.fixture(scope="session")
def engines(tiny_model_dir) -> Engines:
    return Engines(
        encoder=EncoderEngine.from_pretrained(tiny_model_dir),
        prior=PriorEngine.from_pretrained(tiny_model_dir),
        decoder=DecoderEngine.from_pretrained(tiny_model_dir),
        upsampler=UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res"),
    )
