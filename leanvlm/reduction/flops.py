"""Theoretical compute of a schedule (shared/reference/reduction-methods.md: ~4nd^2 + 2n^2 d + 3ndm per layer)."""

from __future__ import annotations

from leanvlm.reduction.schedule import Schedule


def decoder_layer_flops(n: int, d: int, m: int, kv_ratio: float = 1.0) -> float:
    """FLOPs (2 per multiply-accumulate) of one decoder layer over n tokens, width d, SwiGLU MLP width m.

    q/o projections 2nd^2, k/v projections 2nd^2 * kv_ratio (kv_heads / heads, for grouped-query
    attention), scores and weighted values 2n^2 d, MLP 3ndm; causal masking is not discounted.
    """
    macs = 2 * n * d * d + 2 * n * d * d * kv_ratio + 2 * n * n * d + 3 * n * d * m
    return 2.0 * macs


def prefill_flops(schedule: Schedule, text_tokens: int, d: int, m: int, kv_ratio: float = 1.0) -> float:
    """Prefill FLOPs over all decoder layers for a prompt of `text_tokens` plus the schedule's image tokens."""
    return sum(decoder_layer_flops(text_tokens + n, d, m, kv_ratio) for n in schedule.image_tokens_per_layer())


def prefill_flops_ratio(schedule: Schedule, text_tokens: int, d: int, m: int, kv_ratio: float = 1.0) -> float:
    """Reduced / unreduced prefill FLOPs for the same prompt."""
    full = Schedule(schedule.num_layers, schedule.num_image_tokens, ())
    return prefill_flops(schedule, text_tokens, d, m, kv_ratio) / prefill_flops(full, text_tokens, d, m, kv_ratio)
