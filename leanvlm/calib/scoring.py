"""Score candidate schedules on calibration data with the PyTorch reference, fast enough to search.

A candidate is scored the way `leanvlm eval --backend torch` would score its engine: greedy answers through
`Pipeline` (same preprocessing, KV cache and decode), exact match after normalisation. Two things make a
search affordable without changing that result:

- the vision tower runs once per calibration batch (the searched stages are all in the LLM, so its output
  never changes), and
- the prefill state at the input of a decoder layer depends only on the stages of earlier layers, so it is
  saved (`ReducedLlava.prefill_layers`) and candidates that share those stages resume from it. G-Search's
  candidates at layer l all share layers 0..l-1; every candidate shares the unreduced run up to its first stage.

Resuming is exact: the resumed layers run the same ops on the same tensors as a full prefill.

The metric (see `Metric`): answer accuracy without the answers a cut happened to fix (the unreduced model's
accuracy less the answers lost), and the mean KL divergence of the first answer token's distribution from the
unreduced model's, which breaks ties between candidates that keep as many answers.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanvlm.errors import UserError
from leanvlm.runtime.backends.torch import TorchBackend

MIN_N = 8  # fewer calibration samples than this cannot tell candidates apart
DEFAULT_CACHE_BYTES = 3 * 2**30  # saved prefill states, least recently used evicted first


def search_items(data: str | Path, n: int, seed: int = 0) -> list:
    """Calibration samples: the shapes task's `calib` split (disjoint from the `test` split `leanvlm eval`
    answers and from the `train` split the model learnt), or the first n lines of a JSONL file in
    `leanvlm eval --data` format (each line needs answers)."""
    from leanvlm.eval.harness import Item, load_jsonl

    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_N:
        raise UserError(f"--n {n}: use at least {MIN_N} calibration samples (a few hundred tell close schedules "
                        "apart)")
    if str(data) == "shapes":
        from leanvlm.eval.shapes import generate

        return [Item(s.image, s.question, s.answers, s.qtype) for s in generate(n, seed, "calib")]
    items = load_jsonl(data)  # refuses lines without answers
    if len(items) < n:
        raise UserError(f"--data {data}: {len(items)} samples, fewer than --n {n}; lower --n or add samples")
    return items[:n]


@dataclass(frozen=True)
class Metric:
    """A candidate's calibration result. accuracy: greedy answers that match (as `leanvlm eval` counts them);
    kl: mean KL(unreduced || candidate) of the first answer token's distribution, in nats; lost: answers the
    unreduced model got right and this candidate gets wrong, of the unreduced model's `baseline_correct`
    (None: this is the unreduced model)."""

    correct: int
    n: int
    kl: float
    lost: int = 0
    baseline_correct: int | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def gained(self) -> int:
        """Answers this candidate gets right that the unreduced model got wrong."""
        return self.correct - self._kept

    @property
    def retained(self) -> float:
        """The unreduced model's accuracy less the answers lost: the accuracy without the answers a cut happened
        to fix. Cutting tokens does not make a model better, so on calibration data such gains are chance, and a
        search that counts them (picking, among many candidates, the luckiest) gives them back on new data."""
        return self._kept / self.n

    @property
    def _kept(self) -> int:
        """The unreduced model's right answers that this candidate still gets right."""
        return (self.correct if self.baseline_correct is None else self.baseline_correct) - self.lost

    @property
    def objective(self) -> float:
        """Retained accuracy, with KL only breaking ties: the KL term is below half of one sample's worth of
        accuracy, so it never outweighs an answer, but among candidates that keep as many answers the one
        closer to the unreduced model's distribution ranks first (accuracy on a few hundred samples is a step
        function; KL is smooth, so it also gives the optimiser a slope on the steps' flat parts)."""
        return self.retained - 0.5 / self.n * self.kl / (1.0 + self.kl)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n, "lost": self.lost,
                "gained": self.gained, "kl": self.kl}


@dataclass
class ScorerStats:
    candidates: int = 0
    vision_runs: int = 0
    layers_run: int = 0  # decoder layers run in prefill, summed over batches
    layers_resumed: int = 0  # decoder layers skipped by resuming from a saved state
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _StateCache:
    """Saved prefill states keyed by (batch, layer, stages before that layer), least recently used evicted
    past `max_bytes` (tensors shared between states are counted once)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.states: OrderedDict = OrderedDict()

    def get(self, key):
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def put(self, key, state) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        while len(self.states) > 1 and self._bytes() > self.max_bytes:
            self.states.popitem(last=False)

    def _bytes(self) -> int:
        seen: dict[int, int] = {}
        for s in self.states.values():
            for t in (s.h, s.attention_mask, s.position_ids, s.mask, s.cos, s.sin, s.scores, s.original,
                      *[x for kv in s.presents for x in kv], *s.kept, *s.targets):
                if t is not None:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _stage_key(stage) -> tuple:
    return (stage.layer, stage.num_keep, stage.score_at, stage.positions, stage.action, stage.score)


class _ResumingReference(TorchBackend):
    """The torch backend, with the vision output cached per batch and prefill resumed from saved states.
    Content-addressed (a digest of the pixels, of the embeddings), so a cached result is only ever reused for
    the very same inputs. Records each prefill's logits (the KL term)."""

    name = "torch-resuming"

    def __init__(self, spec, hf_model, scorer: "Scorer"):
        super().__init__(spec, hf_model=hf_model)
        self.scorer = scorer
        self.logits: list[np.ndarray] = []

    def vision(self, pixel_values):
        s = self.scorer
        if not s.reuse:
            s.stats.vision_runs += 1
            return super().vision(pixel_values)
        key = _digest(pixel_values)
        if key not in s.vision_cache:
            s.stats.vision_runs += 1
            s.vision_cache[key] = super().vision(pixel_values)
        return s.vision_cache[key]

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        s, ref, schedule = self.scorer, self.ref, self.spec.schedule
        args = [self._t(x) for x in (inputs_embeds, attention_mask, position_ids, image_start)]
        with self.torch.no_grad():
            batch = _digest(*args) if s.reuse else None
            start, state = 0, None
            if s.reuse:
                for layer in range(ref.num_layers - 1, 0, -1):
                    stage = schedule.stage_at(layer)
                    if stage is not None and stage.score != "last_token":
                        continue  # mean_received needs the previous layer's full attention, not saved
                    saved = s.states.get((batch, layer, self._prefix(layer)))
                    if saved is not None:
                        start, state = layer, saved.copy()
                        break
            if state is None:
                state = ref.prefill_start(*args)
            s.stats.layers_resumed += start
            # Save the state at the input of every stage layer (later candidates may share the stages before
            # it), and of every layer of an unreduced run (every candidate shares its first layers).
            saves = {st.layer for st in schedule.stages} if schedule.stages else set(range(1, ref.num_layers))
            for a, b in _runs(start, ref.num_layers, saves):
                if s.reuse and a in saves and a != start:
                    s.states.put((batch, a, self._prefix(a)), state.copy())
                ref.prefill_layers(state, a, b, score_every_layer=s.reuse)
            s.stats.layers_run += ref.num_layers - start
            logits, presents, kept, targets = ref.prefill_finish(state)
        logits = logits.float().cpu().numpy()
        self.logits.append(logits)
        return logits, presents, self._np(kept), self._np(targets)

    def _prefix(self, layer: int) -> tuple:
        return tuple(_stage_key(st) for st in self.spec.schedule.stages if st.layer < layer)


def _runs(start: int, stop: int, cuts: set[int]) -> list[tuple[int, int]]:
    """[start, stop) split at every cut inside it."""
    bounds = [start, *sorted(c for c in cuts if start < c < stop), stop]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class Scorer:
    """Scores schedules of one model on fixed calibration items. `reuse=False` scores every candidate from
    scratch (vision tower and all decoder layers): the naive baseline the search speed is measured against."""

    model: object  # a LoadedModel (leanvlm.models.load_model)
    items: list
    batch: int = 32
    reuse: bool = True
    cache_bytes: int = DEFAULT_CACHE_BYTES
    stats: ScorerStats = field(default_factory=ScorerStats)

    def __post_init__(self):
        from leanvlm.models.llava_config import num_image_tokens
        from leanvlm.runtime.processor import VLMProcessor

        if self.batch < 1:
            raise UserError(f"--batch {self.batch}: must be >= 1")
        cfg = self.model.model.config
        self.num_layers = cfg.text_config.num_hidden_layers
        self.num_image_tokens = num_image_tokens(cfg)
        self.processor = VLMProcessor.from_hf(self.model.processor)
        self.vision_cache: dict = {}
        self.states = _StateCache(self.cache_bytes)
        self._baseline_logits = None
        self.baseline = self.score(self.unreduced())

    def unreduced(self):
        from leanvlm.reduction.schedule import Schedule

        return Schedule(self.num_layers, self.num_image_tokens)

    def score(self, schedule) -> Metric:
        """Greedy-answer accuracy and first-token KL of `schedule` on the calibration items."""
        from leanvlm.eval.harness import evaluate
        from leanvlm.runtime import Pipeline
        from leanvlm.spec.engine import EngineSpec, Limits

        if schedule.vision_stages:
            raise UserError("the schedule search places LLM stages only; vision stages are not searched")
        t0 = time.perf_counter()
        spec = EngineSpec.build(self.model.model.config, schedule, Limits(max_batch=self.batch),
                                source={"model": "in-memory"})
        backend = _ResumingReference(spec, self.model.model, self)
        report = evaluate(Pipeline(spec, backend, self.processor), self.items, self.batch)
        logits = np.concatenate(backend.logits)
        backend.close()
        right = np.array([p["correct"] for p in report.predictions], dtype=bool)
        if self._baseline_logits is None:
            self._baseline_logits, self._baseline_right = logits, right
        kl = _mean_kl(self._baseline_logits, logits)
        self.stats.candidates += 1
        self.stats.seconds += time.perf_counter() - t0
        lost = int((self._baseline_right & ~right).sum())
        return Metric(report.correct, report.n, kl, lost, int(self._baseline_right.sum()))

    def text_tokens(self) -> int:
        """Mean text tokens of the calibration prompts (the chat template around each question, no image
        tokens): the prompt length the FLOPs budget is computed for."""
        from leanvlm.eval.harness import question_prompt
        from leanvlm.runtime.preprocess import chat_prompt

        lengths = [len(self.processor.token_ids(chat_prompt(self.processor, question_prompt(i.question)), 0))
                   for i in self.items]
        return max(1, round(sum(lengths) / len(lengths)))


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in nats."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q - q.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    return float(max(0.0, kl.mean())) if math.isfinite(kl.mean()) else float("inf")
