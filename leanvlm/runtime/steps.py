"""The step API: explicit per-request state and a running decode batch that requests join and leave.

`StepRunner.start` runs vision, embed and prefill for a batch of prepared requests and writes their KV into
free slots of the runner's cache; `step` decodes one token for every running request (each at its own
length and position); `finish` frees a request's slot. `Pipeline.generate/stream` drive it for one batch;
the continuous-batching `Scheduler` drives it across requests that arrive while others decode.

A runner is not thread-safe: one thread drives it (the Pipeline call, or the scheduler's loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from leanvlm.models import layout
from leanvlm.runtime.detokenize import TextState
from leanvlm.runtime.kv_cache import KVCache
from leanvlm.runtime.preprocess import Batch
from leanvlm.runtime.sampling import SamplingParams, select_per_row


@dataclass(eq=False)
class Sequence:
    """One request's decoding state: tokens and text so far, sampling state, its slot and position."""

    params: SamplingParams
    text: TextState
    rng: np.random.Generator
    prompt_token_ids: list[int]
    kept: list[list[int]] = field(default_factory=list)  # per stage, into the original image tokens
    merged: list[list[int]] = field(default_factory=list)
    kept_counts: list[int] = field(default_factory=list)  # per stage: varies per request under adaptive stages
    slot: int = -1
    times: dict = field(default_factory=dict)  # perf_counter stamps: submitted, first_token, finished
    kv_cache: dict = field(default_factory=dict)  # the slot's accounting, taken when it leaves
    cancelled: bool = False
    tag: object = None  # the caller's handle (the scheduler's ticket)

    @property
    def tokens(self) -> list[int]:
        return self.text.tokens

    @property
    def finish_reason(self) -> str | None:
        return "cancelled" if self.cancelled and not self.text.finish else self.text.finish

    @property
    def done(self) -> bool:
        return self.cancelled or self.text.finish is not None

    def cancel(self) -> None:
        """Stop generating; the runner frees the slot at its next step."""
        self.cancelled = True


class StepRunner:
    """A decode batch of up to `slots` requests over one Pipeline's backend."""

    def __init__(self, pipeline, slots: int, round_to: int = 1):
        self.pipeline = pipeline
        self.backend = pipeline.backend
        self.cache = KVCache(pipeline.spec, slots, self.backend.alloc, round_to)
        self.seqs: list[Sequence | None] = [None] * slots
        self.tokens = np.zeros((slots, 1), dtype=np.int64)  # each slot's last token: the next step's input
        self.positions = np.zeros((slots, 1), dtype=np.int64)
        self._no_image: dict[int, object] = {}
        self.last_phase_s: dict = {}  # vision/embed/prefill seconds of the last start()

    @property
    def free(self) -> int:
        return self.seqs.count(None)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.seqs if s is not None]

    def start(self, batch: Batch, params: list[SamplingParams], submitted: list[float] | None = None,
              tags: list | None = None) -> list[Sequence]:
        """Prefill `batch` into free slots and pick each request's first token. A request may be done at once
        (eos, stop or max_new_tokens 1): the caller then calls finish()."""
        be, pipe = self.backend, self.pipeline
        now = time.perf_counter()
        t0 = now
        be.synchronize()
        feats, v_kept, v_targets = be.vision(batch.pixel_values)
        be.synchronize()
        t1 = time.perf_counter()
        embeds = be.embed(batch.input_ids, feats)
        be.synchronize()
        t2 = time.perf_counter()
        logits, presents, l_kept, l_targets = be.prefill(embeds, batch.attention_mask, batch.position_ids,
                                                         batch.image_start)
        be.synchronize()
        t3 = time.perf_counter()
        del embeds, feats
        self.last_phase_s = {"vision_s": t1 - t0, "embed_s": t2 - t1, "prefill_s": t3 - t2}
        kept, merged = pipe._original_indices(v_kept, v_targets, l_kept, l_targets)
        group_masks = None
        adaptive = [st.adaptive for st in pipe.schedule.stages]
        if any(adaptive):  # the batch's K per adaptive stage, and the masked slots in each group's prompt
            group_masks = layout.group_prompt_masks(batch.attention_mask, batch.image_start,
                                                    pipe.spec.model.num_image_tokens, l_kept, adaptive)
        slots = self.cache.admit(presents, batch.attention_mask, [p.max_new_tokens for p in params], group_masks)
        # adaptive stages mark a sample's masked slots -1 (VisionZip's -1 is CLS, a kept token)
        masked = [getattr(st, "adaptive", False) for st in [*pipe.schedule.vision_stages, *pipe.schedule.stages]]
        del presents
        seqs = []
        for b, (p, s) in enumerate(zip(params, slots)):
            seq = Sequence(p, TextState(pipe.tokenizer, p.stop, pipe.eos, p.max_new_tokens, p.ignore_eos),
                           np.random.default_rng(p.seed), batch.prompt_token_ids[b],
                           [[i for i in k[b].tolist() if i >= 0 or not a] for k, a in zip(kept, masked)],
                           [[] if m is None else m[b].tolist() for m in merged],
                           [int((k[b] >= 0).sum()) if a else k.shape[1] for k, a in zip(kept, masked)],
                           slot=s, tag=tags[b] if tags else None)
            seq.times["submitted"] = submitted[b] if submitted else now
            self.seqs[s] = seq
            seqs.append(seq)
        first = select_per_row(logits, params, [s.rng for s in seqs])
        t_first = time.perf_counter()
        real = batch.attention_mask.sum(1)
        for b, seq in enumerate(seqs):
            seq.text.push(first[b])
            seq.times["first_token"] = t_first
            self.tokens[seq.slot, 0] = first[b]
            self.positions[seq.slot, 0] = real[b]  # the token after the full prompt (decode graphs renumber)
        return seqs

    def step(self) -> list[Sequence]:
        """Free cancelled requests, then decode one token for every running one; returns those stepped."""
        for seq in [s for s in self.seqs if s is not None and s.cancelled]:
            self.finish(seq)
        n = self.cache.rows
        if n == 0:
            return []
        be = self.backend
        if n not in self._no_image:
            self._no_image[n] = be.empty_features(n)
        embeds = be.embed(self.tokens[:n], self._no_image[n])
        logits, new_kv = be.decode(embeds, self.positions[:n], self.cache.decode_masks(), self.cache.past())
        self.cache.append(new_kv)
        live = [s for s in self.seqs[:n] if s is not None]
        rows = np.fromiter((s.slot for s in live), dtype=np.int64, count=len(live))
        chosen = select_per_row(logits[rows], [s.params for s in live], [s.rng for s in live])
        self.positions[rows] += 1
        self.tokens[rows, 0] = chosen
        for seq, token in zip(live, chosen):
            seq.text.push(token)
        return live

    def finish(self, seq: Sequence) -> None:
        """Take the request out of the batch and free its slot (its KV accounting is kept on the sequence)."""
        if seq.slot < 0 or self.seqs[seq.slot] is not seq:
            return
        seq.kv_cache = self.cache.stats(seq.slot)
        seq.times["finished"] = time.perf_counter()
        self.cache.release(seq.slot)
        self.seqs[seq.slot] = None
        seq.slot = -1

    def compact(self) -> None:
        """Close holes in the batch (move the last rows down), so decode runs over no unused rows."""
        for src, dst in self.cache.compact():
            seq = self.seqs[src]
            self.seqs[dst], self.seqs[src] = seq, None
            self.tokens[dst], self.positions[dst] = self.tokens[src], self.positions[src]
            seq.slot = dst

    @property
    def holes(self) -> int:
        return self.cache.rows - (len(self.seqs) - self.free)
