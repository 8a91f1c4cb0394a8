"""Per-stage KV cache in slots: one row per running request, per-slot lengths and masks, fed to decode
without copies.

Layers of a cache group share a length per request (its prompt length minus the image tokens dropped before
the group, plus its decoded tokens). Each layer owns key and value buffers `[slots, kv_heads, capacity_g,
head_dim]`; slot b holds one request's entries from position 0 (its prompt pads are not copied in), and
`masks[g]` `[slots, capacity_g + 1]` marks the filled entries of each slot plus the step's own token (last
column). Decode sees rows `[0, rows)` of the buffers as `past_key_values`: a request joins by being written
into a free slot and leaves by freeing it, and the graph returns only each row's new entry, written at that
row's own length. A free slot below the last used one (a hole) is decoded with an all-empty mask and its
output ignored; `compact` moves the last row into the lowest hole when nothing waits to fill it.

Capacity per group grows (rounded up to `round_to` entries, never past the engine's) when an admitted request
needs more, so attention runs over the entries the requests can reach rather than the engine's maximum.
"""

from __future__ import annotations

import numpy as np

from leanvlm.errors import EngineError, UserError
from leanvlm.spec.engine import EngineSpec


class KVCache:
    """KV buffers for up to `slots` requests. `alloc(shape, dtype)` makes a zeroed array of the backend's kind
    (numpy for ONNX Runtime on CPU, torch tensors for the torch backend) in the engine's KV dtype."""

    ROW_WRITES = 4  # append writes up to this many numpy rows one by one (measured: 2x cheaper at 1 row)

    def __init__(self, spec: EngineSpec, slots: int, alloc, round_to: int = 1):
        if slots < 1:
            raise UserError(f"a KV cache needs at least one slot, got {slots}")
        self.groups = spec.cache_groups
        self.slots, self.alloc, self.round_to = slots, alloc, max(1, round_to)
        m = spec.model
        self.num_image_tokens = m.num_image_tokens  # in the LLM prompt
        self.unreduced_image_tokens = m.num_patch_tokens  # every patch (for accounting)
        self.kv_heads, self.head_dim, self.itemsize = m.num_kv_heads, m.head_dim, spec.precision.itemsize
        self.dtype = spec.precision.io_dtype
        self.dropped = [m.num_image_tokens - g.image_tokens for g in self.groups]  # before each group, in the LLM
        self.layer_group = [g for g, grp in enumerate(self.groups) for _ in grp.layers]
        self.capacity = np.zeros(len(self.groups), dtype=np.int64)  # entries allocated per group
        self.keys: list = [None] * len(self.layer_group)
        self.values: list = [None] * len(self.layer_group)
        self.masks = [self._empty_mask(0) for _ in self.groups]
        self.lengths = np.zeros((slots, len(self.groups)), dtype=np.int64)
        self.limit = np.zeros((slots, len(self.groups)), dtype=np.int64)  # prompt + max_new_tokens per slot
        self.active = np.zeros(slots, dtype=bool)
        self._rows = 0  # up to the last active slot: read every decode step, changed by admit/release
        self.slot_dropped = np.zeros((slots, len(self.groups)), dtype=np.int64)  # image tokens dropped before each group

    # ---- slots ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows decode runs over: up to the last used slot."""
        return self._rows

    def _set_active(self, slot: int, active: bool) -> None:
        self.active[slot] = active
        used = np.flatnonzero(self.active)
        self._rows = int(used[-1]) + 1 if used.size else 0

    def free_slots(self) -> list[int]:
        return np.flatnonzero(~self.active).tolist()

    def admit(self, presents: list[tuple], attention_mask: np.ndarray, max_new_tokens: list[int],
              group_masks: list[np.ndarray] | None = None) -> list[int]:
        """Write a prefilled batch (left-padded, `attention_mask` [B, L]) into the lowest free slots, each
        reserving room for its `max_new_tokens`; returns the slot of each row. group_masks: each group's prompt
        mask when it is not the cut prompt mask (adaptive stages keep the batch's largest count K and mask each
        sample's slots beyond its own; models.layout.group_prompt_masks)."""
        batch, width = attention_mask.shape
        free = self.free_slots()
        if batch > len(free):
            raise EngineError(f"KV cache: {batch} requests for {len(free)} free slots")
        slots = free[:batch]
        real = attention_mask.sum(1).astype(np.int64)
        widths = [width - d for d in self.dropped]
        for i, (k, _) in enumerate(presents):
            g = self.layer_group[i]
            # an adaptive group holds K <= cap image tokens, so fewer entries than the manifest's cap implies
            if k.shape[2] != widths[g] and not (group_masks is not None and k.shape[2] < widths[g]):
                raise EngineError(f"layer {i}: the prefill graph returned {k.shape[2]} KV entries where the "
                                  f"manifest's cache group {g} implies {widths[g]}; graph and manifest do not match")
            widths[g] = k.shape[2]
        dropped = [width - w for w in widths]
        for g, grp in enumerate(self.groups):
            for b in range(batch):
                need = int(real[b]) - dropped[g] + int(max_new_tokens[b])
                if need > grp.capacity:
                    raise UserError(f"prompt of {int(real[b])} tokens + max_new_tokens {max_new_tokens[b]} needs "
                                    f"{need} cache entries in group {g}, past this engine's capacity of {grp.capacity}")
        for b, s in enumerate(slots):
            self.limit[s] = [int(real[b]) - d + int(max_new_tokens[b]) for d in dropped]
            self.slot_dropped[s] = dropped
        self._ensure_capacity(np.maximum(self.limit[slots], self.limit[self.active].max(0, initial=0)).max(0))
        for i, (k, v) in enumerate(presents):
            for b, s in enumerate(slots):
                pad = width - int(real[b])  # pads stay at the front when tokens are dropped
                self.keys[i][s, :, : k.shape[2] - pad] = k[b, :, pad:]
                self.values[i][s, :, : k.shape[2] - pad] = v[b, :, pad:]
        for b, s in enumerate(slots):
            self._set_active(s, True)
            pad = width - int(real[b])
            for g in range(len(self.groups)):
                n = widths[g] - pad
                mask = self.masks[g]
                mask[s] = 0
                mask[s, :n] = 1 if group_masks is None else group_masks[g][b, pad:]
                mask[s, -1] = 1
                self.lengths[s, g] = n
        return slots

    def release(self, slot: int) -> None:
        """Free a slot. The buffers stay (a server's next request would reallocate and fault them in again: ~0.1 s
        per request on shapes-llava with 16 slots); they go with the cache."""
        self._set_active(slot, False)
        self.lengths[slot] = 0
        self.limit[slot] = 0
        for mask in self.masks:
            if mask.shape[0]:
                mask[slot] = 0
                mask[slot, -1] = 1

    def compact(self) -> list[tuple[int, int]]:
        """Move the last used rows into the lowest holes; returns the (from, to) moves."""
        moves = []
        while True:
            used = np.flatnonzero(self.active)
            holes = np.flatnonzero(~self.active)
            if not used.size or not holes.size or holes[0] > used[-1]:
                return moves
            src, dst = int(used[-1]), int(holes[0])
            for i in range(len(self.keys)):
                n = int(self.lengths[src, self.layer_group[i]])
                self.keys[i][dst, :, :n] = self.keys[i][src, :, :n]
                self.values[i][dst, :, :n] = self.values[i][src, :, :n]
            for mask in self.masks:
                mask[dst] = mask[src]
            self.lengths[dst], self.limit[dst] = self.lengths[src], self.limit[src]
            self._set_active(dst, True)
            self.slot_dropped[dst] = self.slot_dropped[src]
            self.release(src)
            moves.append((src, dst))

    # ---- decoding ---------------------------------------------------------------------------
    def append(self, new_kv: list[tuple]) -> None:
        """Write each used row's new entry at that row's length (rows [0, rows) as decode ran them)."""
        n = self.rows
        lengths = self.lengths[:n]  # free rows hold 0
        if (lengths >= self.capacity).any():
            raise EngineError("KV cache: a request outgrew its reserved entries")
        if n <= self.ROW_WRITES and isinstance(self.keys[0], np.ndarray):
            # a few rows: one basic-indexed write per row and layer costs less than one fancy-indexed write
            at = lengths.tolist()
            for i, (k, v) in enumerate(new_kv):
                g, keys, values = self.layer_group[i], self.keys[i], self.values[i]
                for b in range(n):
                    keys[b, :, at[b][g]] = k[b, :, 0]
                    values[b, :, at[b][g]] = v[b, :, 0]
        else:
            rows = np.arange(n)
            for i, (k, v) in enumerate(new_kv):
                keys, values = self.keys[i], self.values[i]
                r, a = self._index(keys, rows), self._index(keys, lengths[:, self.layer_group[i]])
                keys[r, :, a] = k[:, :, 0]
                values[r, :, a] = v[:, :, 0]
        live = np.flatnonzero(self.active[:n])
        for g, mask in enumerate(self.masks):
            mask[live, lengths[live, g]] = 1
        lengths[live] += 1

    def past(self) -> list[tuple]:
        """Per layer (key, value) rows [0, rows): views of the buffers, not copies."""
        n = self.rows
        return [(k[:n], v[:n]) for k, v in zip(self.keys, self.values)]

    def decode_masks(self) -> list[np.ndarray]:
        n = self.rows
        return [m[:n] for m in self.masks]

    # ---- internals --------------------------------------------------------------------------
    def _empty_mask(self, capacity: int) -> np.ndarray:
        mask = np.zeros((self.slots, capacity + 1), dtype=np.int64)
        mask[:, -1] = 1
        return mask

    def _ensure_capacity(self, need) -> None:
        for g, grp in enumerate(self.groups):
            if need[g] <= self.capacity[g]:
                continue
            old = self.capacity[g]
            cap = min(grp.capacity, -(-int(need[g]) // self.round_to) * self.round_to)
            shape = (self.slots, self.kv_heads, cap, self.head_dim)
            for i in (i for i, lg in enumerate(self.layer_group) if lg == g):
                for bufs in (self.keys, self.values):
                    new = self.alloc(shape, self.dtype)
                    if bufs[i] is not None and old:
                        new[:, :, :old] = bufs[i][:, :, :old]
                    bufs[i] = new
            mask = self._empty_mask(cap)
            mask[:, :old] = self.masks[g][:, :old]
            self.masks[g] = mask
            self.capacity[g] = cap

    @staticmethod
    def _index(buffer, index: np.ndarray):
        """An index array of the buffer's kind (torch tensors index with tensors on their device)."""
        if isinstance(buffer, np.ndarray):
            return index
        import torch

        return torch.as_tensor(index, device=buffer.device)

    # ---- accounting -------------------------------------------------------------------------
    def _bytes(self, lengths) -> int:
        per_entry = 2 * self.kv_heads * self.head_dim * self.itemsize
        return int(sum(per_entry * int(lengths[g]) for g in self.layer_group))

    def stats(self, slot: int) -> dict:
        """One slot's bytes: reserved, holding entries, and what an unreduced cache would hold at the same point."""
        lengths = [int(n) for n in self.lengths[slot]]
        # entries an unreduced cache would hold: every patch token, where this slot's groups hold what they kept
        extra = self.unreduced_image_tokens - self.num_image_tokens
        unreduced = [n + extra + int(d) for n, d in zip(lengths, self.slot_dropped[slot])]
        used = self._bytes(lengths)
        full = self._bytes(unreduced)
        return {"allocated_bytes": self._bytes(self.limit[slot]), "used_bytes": used, "unreduced_bytes": full,
                "saved_bytes": full - used, "lengths": lengths}
