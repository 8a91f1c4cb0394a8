"""Pipeline: requests -> preprocess -> vision -> embed -> prefill -> decode loop -> text.

Each call runs its batch through the step API (`leanvlm.runtime.steps`): requests that finish leave the
decode batch. A Pipeline may be shared by threads: every call keeps its own state (KV cache, sampling generators),
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
from leanvlm.runtime.backends import Backend, make_backend
from leanvlm.runtime.preprocess import Preprocessor
from leanvlm.runtime.processor import VLMProcessor
from leanvlm.runtime.sampling import SamplingParams
from leanvlm.runtime.steps import Sequence, StepRunner
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
                   dtype: str | None = None, max_pixels: int | None = None,
                   atp_modules: dict | None = None) -> "Pipeline":
        """The PyTorch reference of `schedule` on an in-memory LlavaForConditionalGeneration and its processor
        (transformers' or a VLMProcessor), without exporting: what the schedule search scores candidates on."""
        if not isinstance(processor, VLMProcessor):
            processor = VLMProcessor.from_hf(processor)
        spec = EngineSpec.build(hf_model.config, schedule, limits, source={"model": "in-memory"})
        backend = make_backend(spec, "torch", hf_model=hf_model, device=device, dtype=dtype,
                               atp_modules=atp_modules)
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
            text = requests[0].text.safe_text() if isinstance(requests[0], Sequence) else requests[0].text
            if len(text) > printed:
                yield text[printed:]
                printed = len(text)

    # ---- internals -------------------------------------------------------------------------
    def params(self, **sampling) -> SamplingParams:
        """Validated sampling parameters (the engine's limits applied), as generate() takes them."""
        return self._params(dict(sampling))

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
        """One batch through the step API. Yields the live Sequences after each token when `live`, and finally
        the results. Requests that finish leave the decode batch; the others go on."""
        t0 = time.perf_counter()
        batch = self.preprocess(images, prompts)
        runner = StepRunner(self, batch.size)
        t_vision = time.perf_counter()
        seqs = runner.start(batch, [params] * batch.size, submitted=[t0] * batch.size)
        t_first = time.perf_counter()
        for seq in seqs:
            if seq.done:
                runner.finish(seq)
        if live:
            yield seqs
        steps = 0
        while runner.running:
            for seq in runner.step():
                if seq.done:
                    runner.finish(seq)
            steps += 1
            if live:
                yield seqs
        self.backend.synchronize()
        t_end = time.perf_counter()
        decode_s = t_end - t_first
        decoded = sum(len(s.tokens) - 1 for s in seqs)
        timings = {"ttft_s": t_first - t0, "preprocess_s": t_vision - t0, **runner.last_phase_s,
                   "decode_s": decode_s, "decode_steps": steps,
                   "decode_tokens_per_s": decoded / decode_s if steps and decode_s > 0 else None,
                   "total_s": t_end - t0}
        yield [self._result(s, timings) for s in seqs]

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

    @staticmethod
    def _result(seq: Sequence, timings: dict) -> GenerationResult:
        return GenerationResult(text=seq.text.text, token_ids=list(seq.tokens), prompt_token_ids=seq.prompt_token_ids,
                                kept=seq.kept, kept_counts=seq.kept_counts, finish_reason=seq.finish_reason, timings=dict(timings),
                                kv_cache=seq.kv_cache, merged=seq.merged)
