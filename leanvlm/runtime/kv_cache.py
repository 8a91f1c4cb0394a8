"""Per-stage KV cache: preallocated buffers, one length per cache group, fed to decode without copies.

Layers of a cache group share a length (the prompt length minus the image tokens dropped before the
group). Each layer owns key and value buffers `[batch, kv_heads, capacity_g, head_dim]`. Decode sees
the whole buffer as `past_key_values` and a mask that marks filled slots, so no step copies or
reallocates the cache: the graph returns only the new entry, which is written into slot `length_g`.
Unfilled slots cost attention over masked entries (at most max_new_tokens per step).
"""

from __future__ import annotations

import numpy as np

from leanvlm.errors import EngineError, UserError
from leanvlm.spec.engine import EngineSpec


class KVCache:
    """KV buffers for one batch of requests. `alloc(shape, dtype)` makes a zeroed array of the backend's kind
    (numpy for ONNX Runtime on CPU, torch tensors for the torch backend) in the engine's KV dtype."""

    def __init__(self, spec: EngineSpec, batch: int, prompt_len: int, max_new_tokens: int, alloc,
                 image_tokens: list[int] | None = None):
        """image_tokens: per group, the image tokens this batch's prefill kept when they differ from the spec's
        (adaptive stages keep the batch's largest count, at most the group's cap)."""
        self.groups = spec.cache_groups
        self.batch = batch
        m = spec.model
        self.num_image_tokens = m.num_image_tokens  # in the LLM prompt
        self.unreduced_image_tokens = m.num_patch_tokens  # every patch (for accounting)
        self.kv_heads, self.head_dim, self.itemsize = m.num_kv_heads, m.head_dim, spec.precision.itemsize
        image_tokens = image_tokens or [g.image_tokens for g in self.groups]
        self.image_tokens = list(image_tokens)
        self.prompt_lengths = [prompt_len - (m.num_image_tokens - n) for n in image_tokens]
        self.capacity = [n + max_new_tokens for n in self.prompt_lengths]
        for g, (cap, grp) in enumerate(zip(self.capacity, self.groups)):
            if cap > grp.capacity:
                raise UserError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} needs {cap} cache "
                                f"entries in group {g}, past this engine's capacity of {grp.capacity}")
        self.lengths = [0] * len(self.groups)
        self.layer_group = [g for g, grp in enumerate(self.groups) for _ in grp.layers]
        dtype = spec.precision.io_dtype
        shape = lambda g: (batch, self.kv_heads, self.capacity[g], self.head_dim)  # noqa: E731
        self.keys = [alloc(shape(g), dtype) for g in self.layer_group]
        self.values = [alloc(shape(g), dtype) for g in self.layer_group]
        # masks[g] [B, capacity_g + 1]: filled slots of the group, plus the step's own token (last column)
        self.masks = [np.zeros((batch, cap + 1), dtype=np.int64) for cap in self.capacity]
        for mask in self.masks:
            mask[:, -1] = 1

    def fill(self, presents: list[tuple], attention_mask: np.ndarray, group_masks: list[np.ndarray] | None = None) -> None:
        """Copy the prefill's per-layer KV into the buffers (once per request batch). group_masks: each group's
        prompt mask when it is not the cut prompt mask (adaptive stages mask slots inside the image span;
        models.layout.group_prompt_masks)."""
        for i, (k, v) in enumerate(presents):
            g = self.layer_group[i]
            n = k.shape[2]
            if n != self.prompt_lengths[g]:
                raise EngineError(f"layer {i}: the prefill graph returned {n} KV entries where the manifest's cache "
                                  f"group {g} implies {self.prompt_lengths[g]}; graph and manifest do not match")
            self.keys[i][:, :, :n] = k
            self.values[i][:, :, :n] = v
        for g, n in enumerate(self.prompt_lengths):
            # left padding: pads stay at the front when tokens are dropped, so the cut prompt mask is exact
            self.masks[g][:, :n] = attention_mask[:, :n] if group_masks is None else group_masks[g]
            self.lengths[g] = n

    def append(self, new_kv: list[tuple]) -> None:
        """Write one decoded token's KV into every layer's next slot."""
        for g, n in enumerate(self.lengths):
            if n >= self.capacity[g]:
                raise UserError(f"KV cache group {g} is full ({self.capacity[g]} entries); raise max_new_tokens")
        for i, (k, v) in enumerate(new_kv):
            n = self.lengths[self.layer_group[i]]
            self.keys[i][:, :, n: n + 1] = k
            self.values[i][:, :, n: n + 1] = v
        for g in range(len(self.groups)):
            self.masks[g][:, self.lengths[g]] = 1
            self.lengths[g] += 1

    def past(self) -> list[tuple]:
        return list(zip(self.keys, self.values))

    # ---- accounting -------------------------------------------------------------------------
    def _bytes(self, lengths: list[int]) -> int:
        per_entry = 2 * self.batch * self.kv_heads * self.head_dim * self.itemsize
        return sum(per_entry * lengths[g] for g in self.layer_group)

    def stats(self) -> dict:
        """Bytes allocated, bytes holding entries, and what an unreduced cache would hold at the same point."""
        dropped = [self.unreduced_image_tokens - n for n in self.image_tokens]
        unreduced = [n + d for n, d in zip(self.lengths, dropped)]
        used = self._bytes(self.lengths)
        full = self._bytes(unreduced)
        return {"allocated_bytes": self._bytes(self.capacity), "used_bytes": used, "unreduced_bytes": full,
                "saved_bytes": full - used, "lengths": list(self.lengths)}
