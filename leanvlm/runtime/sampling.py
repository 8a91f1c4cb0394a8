"""Token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator per request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leanvlm.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. A request with a seed samples reproducibly, alone or in a batch."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def validate(self, max_new_limit: int) -> "SamplingParams":
        def bad(name, value, rule):
            raise UserError(f"{name}={value!r}: {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be a positive integer")
        if self.max_new_tokens > max_new_limit:
            bad("max_new_tokens", self.max_new_tokens,
                f"exceeds this engine's limit of {max_new_limit} (re-export with a larger --max-new-tokens)")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", self.seed, "must be a non-negative integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "must be non-empty strings")
        return self


def select_tokens(logits: np.ndarray, params: SamplingParams, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row of `logits` [B, V]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits.astype(np.float64) / params.temperature):
        if params.top_k:
            kth = np.partition(row, -min(params.top_k, row.size))[-min(params.top_k, row.size)]
            row = np.where(row < kth, -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        if params.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            cut = order[int(np.searchsorted(cum, params.top_p)) + 1:]  # keep the smallest set reaching top_p
            probs[cut] = 0
            probs /= probs.sum()
        out[b] = rngs[b].choice(probs.size, p=probs)
    return out


def select_per_row(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row where each row has its own parameters (a continuous batch mixes requests); a row
    samples exactly as it would alone."""
    out = logits.argmax(-1)
    for b, p in enumerate(params):
        if p.temperature != 0:
            out[b] = select_tokens(logits[b: b + 1], p, rngs[b: b + 1])[0]
    return out
