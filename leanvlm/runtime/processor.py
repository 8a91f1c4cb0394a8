"""The engine's text and image preprocessing without torch: the checkpoint's tokenizer (tokenizers, through
transformers' PreTrainedTokenizerFast), its chat template, and CLIP image preprocessing in numpy + PIL.

Why not transformers' LlavaProcessor: its image utilities import torch whenever torch is installed, and a
service or a Jetson running ONNX Runtime engines should not need torch. The image steps below follow
transformers' PIL backend for CLIPImageProcessor (shortest-edge resize with PIL, center crop, rescale,
normalize) and are tested against it; the tokens are the tokenizer's own, with `<image>` expanded to the
number of image tokens the LLM receives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from leanvlm.errors import EngineError

IMAGE_TOKEN = "<image>"
_IMAGE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb")


class ClipImageTransform:
    """CLIPImageProcessor's steps on PIL images -> float32 [3, H, W]."""

    def __init__(self, config: dict):
        self.config = {k: config[k] for k in _IMAGE_KEYS if k in config}
        c = self.config
        self.size = c.get("size") or {"shortest_edge": 224}
        self.crop = c.get("crop_size") or {"height": 224, "width": 224}
        self.resample = int(c.get("resample", 3))
        self.mean = np.asarray(c.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), np.float32)
        self.std = np.asarray(c.get("image_std", [0.26862954, 0.26130258, 0.27577711]), np.float32)
        self.scale = float(c.get("rescale_factor", 1 / 255))

    def _resize_to(self, width: int, height: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            s = int(self.size["shortest_edge"])
            if width <= height:
                return s, int(s * height / width)
            return int(s * width / height), s
        return int(self.size["width"]), int(self.size["height"])

    def __call__(self, image) -> np.ndarray:
        c = self.config
        if c.get("do_convert_rgb", True):
            image = image.convert("RGB")
        if c.get("do_resize", True):
            image = image.resize(self._resize_to(*image.size), resample=self.resample)
        x = np.moveaxis(np.asarray(image), -1, 0)  # [C, H, W] uint8
        if c.get("do_center_crop", True):
            x = _center_crop(x, int(self.crop["height"]), int(self.crop["width"]))
        if c.get("do_rescale", True):
            x = (x.astype(np.float64) * self.scale).astype(np.float32)
        x = x.astype(np.float32)
        if c.get("do_normalize", True):
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of [C, H, W], zero-padding an image smaller than the crop (as transformers does)."""
    h, w = x.shape[1:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[:, top: top + height, left: left + width]
    nh, nw = max(height, h), max(width, w)
    padded = np.zeros((x.shape[0], nh, nw), x.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[:, tp: tp + h, lp: lp + w] = x
    top, left = top + tp, left + lp
    return padded[:, max(0, top): min(nh, top + height), max(0, left): min(nw, left + width)]


class VLMProcessor:
    """Tokenizer + chat template + image transform of one checkpoint."""

    def __init__(self, tokenizer, chat_template: str | None, image_config: dict):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_transform = ClipImageTransform(image_config)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    @classmethod
    def load(cls, directory: str | Path) -> "VLMProcessor":
        """From files saved by a LlavaProcessor (an engine directory or a checkpoint)."""
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise EngineError(f"{directory}: no tokenizer.json (a fast tokenizer file is required)")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
        return cls(tokenizer, _read_chat_template(directory), _read_image_config(directory))

    @classmethod
    def from_hf(cls, processor) -> "VLMProcessor":
        """From an in-memory transformers LlavaProcessor."""
        return cls(processor.tokenizer, getattr(processor, "chat_template", None),
                   processor.image_processor.to_dict())

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text (the same call as a transformers processor's)."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)

    def pixel_values(self, images: list) -> np.ndarray:
        return np.stack([self.image_transform(img) for img in images]).astype(np.float32)

    def token_ids(self, text: str, image_tokens: int) -> list[int]:
        """Token ids of a templated prompt with each `<image>` expanded to `image_tokens` ids."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        out: list[int] = []
        for t in ids:
            out.extend([t] * image_tokens if t == self.image_token_id else [t])
        return out


def _read_chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = directory / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def _read_image_config(directory: Path) -> dict:
    proc = directory / "processor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text())
        if isinstance(data.get("image_processor"), dict):
            return data["image_processor"]
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        return json.loads(pre.read_text())
    raise EngineError(f"{directory}: no image processor config (processor_config.json or preprocessor_config.json)")
