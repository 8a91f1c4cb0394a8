"""Pipeline: requests -> preprocess -> vision -> embed -> prefill -> decode loop -> text.

A Pipeline may be shared by threads: every call keeps its own state (KV cache, sampling generators),
ONNX Runtime sessions are thread-safe for concurrent runs, and the torch backend only reads its model.
A bad request raises UserError and leaves the Pipeline as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from leanvlm.errors import UserError
from leanvlm.models import layout
from leanvlm.runtime.backends import Backend, make_backend
from leanvlm.runtime.kv_cache import KVCache
from leanvlm.runtime.preprocess import Batch, Preprocessor
from leanvlm.runtime.processor import VLMProcessor
from leanvlm.runtime.sampling import SamplingParams, make_rngs, select_tokens
from leanvlm.spec import defaults
from leanvlm.spec.engine import EngineSpec, Limits
from leanvlm.spec.manifest import load_engine_spec


@dataclass
class GenerationResult:
    """One request's output. `kept[s]` are the image-token indices stage s kept (into the original tokens) and
    `kept_counts[s]` how many: per request, it varies under adaptive stages."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    kept: list[list[int]]
    finish_reason: str  # "eos", "stop" or "length"
    merged: list[list[int]] = field(default_factory=list)  # per stage: tokens that absorbed others (merges)
    kept_counts: list[int] = field(default_factory=list)  # per stage: image tokens kept for this request
    timings: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "kept": self.kept, "kept_counts": self.kept_counts, "merged": self.merged, "finish_reason": self.finish_reason,
                "timings": self.timings, "kv_cache": self.kv_cache}


class _Request:
    """Per-request decoding state: tokens, finish, stop-string handling."""

    def __init__(self, tokenizer, params: SamplingParams, eos: set[int]):
        self.tokenizer, self.params, self.eos = tokenizer, params, eos
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = ""

    def push(self, token: int) -> None:
        if self.finish:
            return
        self.tokens.append(int(token))
        if token in self.eos and not self.params.ignore_eos:
            self.finish = "eos"
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.params.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
        if not self.finish and len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"

    def safe_text(self) -> str:
        """Text that can be streamed now: no half-decoded character, no possible start of a stop string."""
        if self.finish:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold]


class Pipeline:
    """Drives an engine. Build with `Pipeline.load(engine_dir, backend=...)`, or `Pipeline.from_model(...)` for
    the PyTorch reference of a schedule without exporting."""

    def __init__(self, spec: EngineSpec, backend: Backend, processor: VLMProcessor, max_pixels: int | None = None):
        self.spec = spec
        self.backend = backend
        self.processor = processor
        self.tokenizer = processor.tokenizer
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        self.preprocess = Preprocessor(processor, spec, **kwargs)
        self.eos = set(spec.model.eos_token_ids)
        self.schedule = spec.schedule

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = defaults.BACKEND, **options) -> "Pipeline":
        """Validate the engine directory (manifest, checksums) and open it with `backend`.

        Options: those of the backend (see `leanvlm.runtime.backends`: providers, threads, low_memory for onnxruntime;
        device, dtype, model_path for torch) and max_pixels.
        """
        spec = load_engine_spec(engine_dir)
        processor = VLMProcessor.load(spec.directory)
        max_pixels = options.pop("max_pixels", None)
        return cls(spec, make_backend(spec, backend, **options), processor, max_pixels)

    @classmethod
    def from_model(cls, hf_model, processor, schedule, limits: Limits | None = None, device: str | None = None,
                   dtype: str | None = None, max_pixels: int | None = None, atp_modules: dict | None = None) -> "Pipeline":
        """The PyTorch reference of `schedule` on an in-memory LlavaForConditionalGeneration and its processor
        (transformers' or a VLMProcessor), without exporting: what the schedule search scores candidates on."""
        if not isinstance(processor, VLMProcessor):
            processor = VLMProcessor.from_hf(processor)
        spec = EngineSpec.build(hf_model.config, schedule, limits, source={"model": "in-memory"})
        backend = make_backend(spec, "torch", hf_model=hf_model, device=device, dtype=dtype, atp_modules=atp_modules)
        return cls(spec, backend, processor, max_pixels)

    @property
    def manifest(self) -> dict:
        """The manifest as read (empty for an in-memory Pipeline)."""
        return self.spec.raw

    # ---- public API ------------------------------------------------------------------------
    def generate(self, image=None, prompt: str | None = None, *, images: list | None = None,
                 prompts: list[str] | None = None, **sampling):
        """Generate for one request (image=, prompt=) -> GenerationResult, or a batch (images=, prompts=) ->
        list[GenerationResult]. Sampling: max_new_tokens, temperature, top_k, top_p, seed, stop."""
        single = images is None and prompts is None
        if single:
            if image is None or prompt is None:
                raise UserError("give image= and prompt= (or images= and prompts= for a batch)")
            images, prompts = [image], [prompt]
        elif image is not None or prompt is not None:
            raise UserError("give either image=/prompt= or images=/prompts=, not both")
        elif images is None or prompts is None:
            raise UserError("a batch needs both images= and prompts=")
        results = None
        for results in self._run(list(images), list(prompts), self._params(sampling)):
            pass
        return results[0] if single else results

    def stream(self, image, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces of one request as they are decoded; joined they equal generate()'s text."""
        requests = None
        printed = 0
        for requests in self._run([image], [prompt], self._params(sampling), live=True):
            text = requests[0].safe_text() if isinstance(requests[0], _Request) else requests[0].text
            if len(text) > printed:
                yield text[printed:]
                printed = len(text)

    # ---- internals -------------------------------------------------------------------------
    def _params(self, sampling: dict) -> SamplingParams:
        known = set(SamplingParams.__dataclass_fields__)
        unknown = set(sampling) - known
        if unknown:
            raise UserError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(known)}")
        stop = sampling.get("stop") or ()
        sampling["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        limit = self.spec.limits.max_new_tokens
        if sampling.get("max_new_tokens") is None:
            sampling["max_new_tokens"] = min(defaults.GENERATE_MAX_NEW_TOKENS, limit)
        return SamplingParams(**sampling).validate(limit)

    def _run(self, images: list, prompts: list[str], params: SamplingParams, live: bool = False):
        """Yields the live _Request list after each token when `live`, and finally the results."""
        t0 = time.perf_counter()
        batch = self.preprocess(images, prompts)
        be = self.backend
        sync = be.synchronize
        sync()
        t_vision = time.perf_counter()
        feats, v_kept, v_targets = be.vision(batch.pixel_values)
        sync()
        t_vision_end = time.perf_counter()
        embeds = be.embed(batch.input_ids, feats)
        sync()
        t_pre = time.perf_counter()
        logits, presents, l_kept, l_targets = be.prefill(embeds, batch.attention_mask, batch.position_ids,
                                                         batch.image_start)
        sync()
        t_prefilled = time.perf_counter()
        kept, merged = self._original_indices(v_kept, v_targets, l_kept, l_targets)
        image_tokens = group_masks = None
        adaptive = [st.adaptive for st in self.schedule.stages]
        if any(adaptive):  # the batch's K per adaptive stage, and the masked slots in each group's prompt
            n = self.spec.model.num_image_tokens
            image_tokens = [n, *[k.shape[1] for k in l_kept]]
            group_masks = layout.group_prompt_masks(batch.attention_mask, batch.image_start, n, l_kept, adaptive)
        cache = KVCache(self.spec, batch.size, batch.input_ids.shape[1], params.max_new_tokens, be.alloc,
                        image_tokens)
        cache.fill(presents, batch.attention_mask, group_masks)
        del presents
        rngs = make_rngs(params, batch.size)
        requests = [_Request(self.tokenizer, params, self.eos) for _ in range(batch.size)]
        tokens = select_tokens(logits, params, rngs)
        for r, t in zip(requests, tokens):
            r.push(t)
        t_first = time.perf_counter()
        if live:
            yield requests
        position = batch.attention_mask.sum(1, keepdims=True).astype(np.int64)
        no_image = be.empty_features(batch.size)
        steps = 0
        while not all(r.finish for r in requests):
            step = be.embed(tokens[:, None].astype(np.int64), no_image)
            logits, new_kv = be.decode(step, position, cache.masks, cache.past())
            cache.append(new_kv)
            position += 1
            steps += 1
            tokens = select_tokens(logits, params, rngs)
            for r, t in zip(requests, tokens):
                r.push(t)
            if live:
                yield requests
        sync()
        t_end = time.perf_counter()
        decode_s = t_end - t_first
        timings = {"ttft_s": t_first - t0, "preprocess_s": t_vision - t0, "vision_s": t_vision_end - t_vision,
                   "embed_s": t_pre - t_vision_end, "prefill_s": t_prefilled - t_pre,
                   "decode_s": decode_s, "decode_steps": steps,
                   "decode_tokens_per_s": steps * batch.size / decode_s if steps and decode_s > 0 else None,
                   "total_s": t_end - t0}
        kv = cache.stats()
        yield [self._result(r, b, batch, kept, merged, timings, kv) for b, r in enumerate(requests)]

    def _original_indices(self, v_kept, v_targets, l_kept, l_targets):
        """Per stage (vision stages, then LLM stages): kept and merge-target indices into the original patches.

        LLM stages report indices into the LLM's image tokens; the last vision stage's kept list maps those
        back (for VisionZip, a contextual token maps to its target patch)."""
        to_patch = v_kept[-1] if v_kept else None

        def lift(x):
            return x if to_patch is None else np.take_along_axis(to_patch, x, 1)

        kept = [*v_kept, *[lift(k) for k in l_kept]]
        targets = iter([*v_targets, *[lift(t) for t in l_targets]])
        merged = [next(targets) if st.merges else None for st in [*self.schedule.vision_stages, *self.schedule.stages]]
        return kept, merged

    def _result(self, r: _Request, b: int, batch: Batch, kept, merged, timings, kv) -> GenerationResult:
        # adaptive stages mark masked slots -1 (VisionZip's -1 is CLS, a kept token)
        masked = [getattr(st, "adaptive", False) for st in [*self.schedule.vision_stages, *self.schedule.stages]]
        return GenerationResult(text=r.text, token_ids=r.tokens, prompt_token_ids=batch.prompt_token_ids[b],
                                kept=[[i for i in k[b].tolist() if i >= 0 or not a] for k, a in zip(kept, masked)],
                                kept_counts=[int((k[b] >= 0).sum()) if a else k.shape[1] for k, a in zip(kept, masked)],
                                finish_reason=r.finish, timings=dict(timings),
                                kv_cache=kv, merged=[[] if m is None else m[b].tolist() for m in merged])

