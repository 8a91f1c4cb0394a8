"""Shared fixtures: one tiny checkpoint and a few exported engines per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models go to a per-session cache; the hub is never contacted."""
    os.environ["LEANVLM_CACHE"] = str(tmp_path_factory.mktemp("leanvlm-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def pytest_collection_modifyitems(config, items):
    """Tests marked `tensorrt` are skipped, with the reason, where the tensorrt package is absent."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        return
    skip = pytest.mark.skip(reason="TensorRT is not installed here (pip install leanvlm[tensorrt] on an NVIDIA machine)")
    for item in items:
        if "tensorrt" in item.keywords:
            item.add_marker(skip)


EXERCISED: set[tuple[str, str]] = set()  # (schedule method, backend) of every engine a test opened


@pytest.fixture(scope="session", autouse=True)
def _record_exercised_backends():
    """Record which reduction method each opened backend ran (read by test_zz_coverage)."""
    from leanvlm.runtime.backends.base import Backend

    original = Backend.__init__

    def record(self, spec):
        EXERCISED.add((spec.schedule.method, self.name))
        original(self, spec)

    Backend.__init__ = record
    yield
    Backend.__init__ = original


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from leanvlm.models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def engines(tmp_path_factory, tiny_dir):
    """export(keep, layer=2, **opts) -> ExportResult, each distinct export made once per session."""
    from leanvlm.export import ExportOptions, export_engine

    made: dict = {}
    root = tmp_path_factory.mktemp("engines")

    def export(keep: float, layer: int = 2, **opts):
        key = (keep, layer, tuple(sorted(opts.items())))
        if key not in made:
            out = root / f"keep{keep}-layer{layer}-{len(made)}"
            opts = {k: v for k, v in opts.items() if k != "external"}  # "external" only tags the cache key
            made[key] = export_engine(ExportOptions(model=str(tiny_dir), keep=keep, layer=layer, out=out, **opts))
        return made[key]

    return export


@pytest.fixture
def engine_copy(engines, tmp_path) -> Path:
    """A private copy of the keep-0.33 engine, for tests that damage it."""
    import shutil

    dst = tmp_path / "engine"
    shutil.copytree(engines(0.33).out, dst)
    return dst


def images(n: int, size: int = 40, seed: int = 0):
    """n random RGB PIL images (distinct content so selections differ per sample)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


PROMPTS = [
    "What is in the picture?",
    "Describe the image in detail: every corner, colour and shape you can see there.",
    "Is there a red circle?",
]


def chat(processor, prompt: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)
