"""Requests -> engine inputs: images and prompts through the engine's processor, checked against its limits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanvlm.errors import UserError
from leanvlm.models import layout
from leanvlm.runtime.images import DEFAULT_MAX_PIXELS, load_image
from leanvlm.runtime.processor import IMAGE_TOKEN, VLMProcessor
from leanvlm.spec.engine import EngineSpec


@dataclass
class Batch:
    """Left-padded engine inputs for a batch of requests."""

    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] int64
    pixel_values: np.ndarray  # [B, 3, H, W], the engine's float dtype
    position_ids: np.ndarray  # [B, L] int64
    image_start: np.ndarray  # [B] int64
    prompt_token_ids: list[list[int]]  # unpadded, image tokens expanded

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Prepared:
    """One validated request: prompt token ids (image tokens expanded) and its pixels [3, H, W]."""

    token_ids: list[int]
    pixel_values: np.ndarray


def chat_prompt(processor, prompt: str) -> str:
    """`prompt` with one image in the checkpoint's chat template, ready for generation (a transformers
    processor or a VLMProcessor)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


class Preprocessor:
    """Wraps the engine's processor; validates against the spec's limits."""

    def __init__(self, processor: VLMProcessor, spec: EngineSpec, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.processor = processor
        self.model = spec.model
        self.limits = spec.limits
        self.dtype = np.dtype(spec.precision.io_dtype)
        self.max_pixels = max_pixels

    def template(self, prompt: str) -> str:
        """Wrap a plain prompt in the chat template with one image; a prompt holding `<image>` is used as is."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("prompt: must be a non-empty string")
        if IMAGE_TOKEN in prompt:
            if prompt.count(IMAGE_TOKEN) != 1:
                raise UserError(f"prompt: a templated prompt must hold exactly one {IMAGE_TOKEN}")
            return prompt
        return chat_prompt(self.processor, prompt)

    def prepare(self, image, prompt: str) -> Prepared:
        """One request checked and converted: its prompt tokens (within the engine's limit) and pixels. Runs
        before a request joins a batch, so a bad one is refused without touching the others."""
        n_img = self.model.num_image_tokens
        row = self.processor.token_ids(self.template(prompt), n_img)
        if len(row) > self.limits.max_prompt:
            raise UserError(f"prompt: {len(row)} tokens (with {n_img} image tokens) exceeds this engine's limit of "
                            f"{self.limits.max_prompt}; shorten it or re-export with a larger --max-prompt")
        pixels = self.processor.pixel_values([load_image(image, self.max_pixels)]).astype(self.dtype)[0]
        return Prepared(row, pixels)

    def collate(self, requests: list[Prepared]) -> Batch:
        """Prepared requests -> one left-padded batch (dropped image tokens are then never pads)."""
        rows = [r.token_ids for r in requests]
        width = max(map(len, rows))
        ids = np.full((len(rows), width), self.processor.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = row
            mask[b, width - len(row):] = 1
        start = layout.image_starts(ids, self.model.image_token_id, self.model.num_image_tokens)
        pixels = np.stack([r.pixel_values for r in requests])
        return Batch(ids, mask, pixels, layout.prompt_positions(mask), start, rows)

    def __call__(self, images: list, prompts: list[str]) -> Batch:
        if len(images) != len(prompts):
            raise UserError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        if not prompts:
            raise UserError("no requests: give at least one image and prompt")
        if len(prompts) > self.limits.max_batch:
            raise UserError(f"batch of {len(prompts)} exceeds this engine's limit of {self.limits.max_batch} "
                            "(re-export with a larger --max-batch, or split the batch)")
        prepared = []
        for b, (image, prompt) in enumerate(zip(images, prompts)):
            try:
                prepared.append(self.prepare(image, prompt))
            except UserError as e:
                raise type(e)(f"request {b}: {e}" if len(prompts) > 1 else str(e)) from e
        return self.collate(prepared)
