"""Where things sit in a LLaVA prompt: the image-token span and left-padded position ids (numpy).

One implementation for the runtime (numpy) and the reference (torch tensors convert at the edge).
"""

from __future__ import annotations

import numpy as np

from leanvlm.errors import UserError


def image_starts(input_ids: np.ndarray, image_token_id: int, num_image_tokens: int) -> np.ndarray:
    """Index of the first image token of each row; each row must hold exactly one contiguous run of them."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if not (counts == num_image_tokens).all():
        raise UserError(f"each prompt needs exactly one image ({num_image_tokens} image tokens after expansion); "
                        f"got {counts.tolist()}")
    start = is_image.argmax(1)
    run = np.take_along_axis(is_image, start[:, None] + np.arange(num_image_tokens)[None], 1)
    if not run.all():
        raise UserError("the image tokens of a prompt are not contiguous; put one <image> placeholder per prompt")
    return start.astype(np.int64)


def prompt_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded prompt, as Hugging Face generate makes them (pads get 1)."""
    return np.where(attention_mask == 0, 1, np.cumsum(attention_mask, 1) - 1).astype(np.int64)
