"""Requests -> engine inputs: images through the processor, prompts through the chat template and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanvlm.errors import UserError
from leanvlm.models import layout
from leanvlm.runtime.images import DEFAULT_MAX_PIXELS, load_image

IMAGE_TOKEN = "<image>"


@dataclass
class Batch:
    """Left-padded engine inputs for a batch of requests."""

    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] int64
    pixel_values: np.ndarray  # [B, 3, H, W] float32
    position_ids: np.ndarray  # [B, L] int64
    image_start: np.ndarray  # [B] int64
    prompt_token_ids: list[list[int]]  # unpadded, image tokens expanded

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def chat_prompt(processor, prompt: str) -> str:
    """`prompt` with one image in the checkpoint's chat template, ready for generation."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


class Preprocessor:
    """Wraps the engine's processor; validates against the manifest's limits."""

    def __init__(self, processor, manifest, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.processor = processor
        self.model = manifest["model"]
        self.limits = manifest.limits
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

    def __call__(self, images: list, prompts: list[str]) -> Batch:
        if len(images) != len(prompts):
            raise UserError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        if not prompts:
            raise UserError("no requests: give at least one image and prompt")
        if len(prompts) > self.limits["max_batch"]:
            raise UserError(f"batch of {len(prompts)} exceeds this engine's limit of {self.limits['max_batch']} "
                            "(re-export with a larger --max-batch, or split the batch)")
        texts = [self.template(p) for p in prompts]
        pil = [load_image(img, self.max_pixels) for img in images]
        enc = self.processor(images=pil, text=texts, return_tensors="np", padding=True)
        ids, mask = _collapse_image_tokens(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64),
                                           self.model["image_token_id"],
                                           self.model.get("num_patch_tokens", self.model["num_image_tokens"]),
                                           self.model["num_image_tokens"])
        lengths = mask.sum(1)
        if int(lengths.max()) > self.limits["max_prompt"]:
            worst = int(lengths.argmax())
            raise UserError(f"prompt {worst}: {int(lengths[worst])} tokens (with {self.model['num_image_tokens']} image "
                            f"tokens) exceeds this engine's limit of {self.limits['max_prompt']}; shorten it or "
                            "re-export with a larger --max-prompt")
        start = layout.image_starts(ids, self.model["image_token_id"], self.model["num_image_tokens"])
        positions = layout.prompt_positions(mask)
        prompt_ids = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
        return Batch(ids, mask, enc["pixel_values"].astype(np.float32), positions, start, prompt_ids)


def _collapse_image_tokens(ids: np.ndarray, mask: np.ndarray, image_token_id: int, expanded: int, wanted: int):
    """The processor expands `<image>` to one token per patch; vision-encoder stages hand the LLM fewer image
    features, so each row's run is cut to `wanted` tokens (every row loses the same count: padding stays left)."""
    if expanded == wanted:
        return ids, mask
    is_image = ids == image_token_id
    rank = np.cumsum(is_image, 1)
    keep = ~(is_image & (rank > wanted))
    if not (keep.sum(1) == ids.shape[1] - (expanded - wanted)).all():
        raise UserError(f"each prompt needs exactly one image ({expanded} image tokens after expansion)")
    rows = keep.sum(1)[0]
    return ids[keep].reshape(-1, rows), mask[keep].reshape(-1, rows)
