"""Scoring and selection ops. Every shape here is static given the schedule, so the ops export as a
constant-k TopK plus Gather (no NonZero, no dynamic-k sort)."""

from __future__ import annotations

import torch


def last_query_scores(q_last: torch.Tensor, keys: torch.Tensor, mask_row: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax attention of one query row over all keys.

    q_last [B, H, 1, d], keys [B, H, S, d] (kv heads already repeated), mask_row [B, 1, 1, S] additive.
    Returns [B, S]. Only this row is formed, so the layer's own attention can stay fused.
    """
    # float32 at every precision: these scores pick the tokens (fp16 rounding would flip near ties)
    logits = torch.matmul(q_last.float(), keys.float().transpose(-1, -2)) * scale + mask_row.float()
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=1)[:, 0]


def image_scores(scores: torch.Tensor, image_start: torch.Tensor, num_image: int) -> torch.Tensor:
    """Scores of the `num_image` contiguous image tokens starting at `image_start` [B] -> [B, N]."""
    idx = image_start[:, None] + torch.arange(num_image, device=scores.device)[None, :]
    return torch.gather(scores, 1, idx)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row, in ascending index order (kept tokens keep their order)."""
    top = torch.topk(scores, k, dim=1).indices
    # Ordering k indices is a second TopK with the same constant k (a sort would be a dynamic-k TopK),
    # on float32 because TensorRT's TopK takes float inputs only (indices < 2^24 are exact).
    return torch.topk(top.to(torch.float32), k, dim=1, largest=False).values.to(torch.int64)


def keep_index(image_start: torch.Tensor, kept: torch.Tensor, seq_len: torch.Tensor | int, num_image: int) -> torch.Tensor:
    """Sequence positions that survive a stage: text before the image, kept image tokens, text after.

    Built arithmetically from `image_start` [B] and `kept` [B, k] (ascending, into the image tokens):
    the output length seq_len - num_image + k is known at build time up to the dynamic seq_len.
    """
    k = kept.shape[1]
    new_len = seq_len - num_image + k
    j = torch.arange(new_len, device=kept.device)[None, :]
    s = image_start[:, None]
    in_image = torch.gather(kept, 1, (j - s).clamp(0, k - 1)) + s
    return torch.where(j < s, j, torch.where(j < s + k, in_image, j - k + num_image))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] gathered along the sequence by index [B, L'] -> [B, L', ...]."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def renumber_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous position ids of a (reduced) left-padded sequence, pads at 1 (PyramidDrop's renumbering).

    float32 CumSum for TensorRT (its CumSum takes float only); lengths < 2^24 are exact.
    """
    m = attention_mask.to(torch.float32)
    pos = (torch.cumsum(m, dim=1) - 1.0).to(torch.int64)
    return torch.where(attention_mask > 0, pos, torch.ones_like(pos))


def mask_slots(attention_mask: torch.Tensor, image_start: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """Zero the mask of the image slots [image_start, image_start + K) whose `slot_valid` [B, K] is False (the
    tokens an adaptive stage took for the batch but not for this sample)."""
    k = slot_valid.shape[1]
    j = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    rel = j - image_start[:, None]
    in_image = (rel >= 0) & (rel < k)
    ok = torch.gather(slot_valid, 1, torch.where(in_image, rel, torch.zeros_like(rel)))
    return torch.where(in_image & ~ok, torch.zeros_like(attention_mask), attention_mask)
