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


def group_prompt_masks(attention_mask: np.ndarray, image_start: np.ndarray, num_image_tokens: int,
                       stage_kept: list[np.ndarray], adaptive: list[bool]) -> list[np.ndarray]:
    """The prompt mask of each cache group's KV entries, from the prefill's kept indices of the LLM stages.

    A fixed stage drops tokens from the image span, and left padding keeps the pads at the front, so its group's
    mask is the previous one cut to the new length. An adaptive stage keeps K slots (the batch's largest count)
    of which a sample's slots beyond its own count (kept index -1) are masked."""
    masks = [attention_mask]
    cur, n = attention_mask, num_image_tokens
    s = image_start[:, None]
    for kept, is_adaptive in zip(stage_kept, adaptive):
        k = kept.shape[1]
        length = cur.shape[1] - n + k
        if is_adaptive:
            j = np.arange(length)[None]
            rel = j - s
            in_image = (rel >= 0) & (rel < k)
            src = np.where(rel < 0, j, np.where(in_image, 0, j - k + n))
            slot = (np.take_along_axis(kept, np.clip(rel, 0, max(k - 1, 0)), 1) >= 0).astype(cur.dtype)
            cur = np.where(in_image, slot, np.take_along_axis(cur, src, 1))
        else:
            cur = cur[:, :length]
        masks.append(cur)
        n = k
    return masks
