"""`leanvlm parity`: an engine against the PyTorch reference of the same schedule, and the reduced model
against the unreduced one.

Prefill (last-token logits, present KV, kept indices) is compared with Polygraphy's Comparator: the
ONNX Runtime runner against a torch runner on the same feeds; float outputs with SimpleCompareFunc at the
engine precision's tolerances, kept indices and merge targets as indices (IndicesCompareFunc, exact).
Polygraphy's log goes to stderr, so a caller's stdout carries only its own report. Greedy decoding over S
steps is stateful (KV cache, token feedback), which Comparator's one-feed-one-result model does not cover,
so it runs through two Pipelines (onnxruntime and torch backends) and compares token streams.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from leanvlm.export.verify import index_overlap
from leanvlm.spec import names


@dataclass
class ParityReport:
    samples: int
    steps: int
    logits_max_abs: float
    logits_max_rel: float
    kept_agreement: float  # fraction of (sample, stage) kept-index sets that are equal
    greedy_agreement: float  # fraction of generated positions equal, engine vs reference
    polygraphy_passed: bool
    reduced_vs_unreduced: dict = field(default_factory=dict)  # greedy agreement, logit KL
    atol: float = 1e-4  # the logits tolerance applied
    precision: str = "fp32"
    greedy_required: float = 1.0  # the precision's required greedy agreement
    kept_overlap: float = 1.0  # worst row's fraction of the reference's kept indices the engine also kept
    kept_overlap_required: float = 1.0

    @property
    def passed(self) -> bool:
        return (self.polygraphy_passed and self.kept_overlap >= self.kept_overlap_required
                and self.greedy_agreement >= self.greedy_required)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def sample_requests(n: int, size: int, seed: int = 0):
    """n deterministic test requests: random-pixel images and a rotating set of prompts."""
    from PIL import Image

    prompts = ["What is in the picture?", "Describe the image in detail.", "Is there a red circle?",
               "How many shapes are there, and which colour is each one?"]
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return images, [prompts[i % len(prompts)] for i in range(n)]


class TorchPrefillRunner:
    """A Polygraphy runner for the reference prefill (built lazily so polygraphy stays optional)."""

    def __new__(cls, backend, io: dict):
        from polygraphy.backend.base import BaseRunner

        from polygraphy.common import TensorMetadata

        class _Runner(BaseRunner):
            def __init__(self):
                super().__init__(name="torch-reference")

            def activate_impl(self):
                pass

            def deactivate_impl(self):
                pass

            def get_input_metadata_impl(self):
                meta = TensorMetadata()
                for i in io["inputs"]:
                    meta.add(i["name"], np.dtype(i["dtype"]), [d if isinstance(d, int) else -1 for d in i["shape"]])
                return meta

            def infer_impl(self, feed_dict):
                start = time.perf_counter()
                logits, presents, kept, targets = backend.prefill(
                    feed_dict["inputs_embeds"], feed_dict["attention_mask"], feed_dict["position_ids"],
                    feed_dict.get("image_start", np.zeros(feed_dict["inputs_embeds"].shape[0], np.int64)))
                out = OrderedDict({names.LOGITS: logits})
                kv = [t.float().cpu().numpy() for pair in presents for t in pair]
                out.update(zip(names.present_names(len(presents)), kv))
                index_names = names.stage_output_names([st.merges for st in backend.spec.schedule.stages])
                out.update(zip(index_names, [*kept, *targets]))
                self.inference_time = time.perf_counter() - start  # Comparator sums these
                return out

        return _Runner()


def run_parity(engine_dir, samples: int = 4, steps: int = 16, atol: float | None = None, rtol: float = 1e-3,
               seed: int = 0) -> ParityReport:
    """Compare the engine (onnxruntime) with the fp32 torch reference; see the module docstring. atol (one
    absolute tolerance for every float output) defaults to the engine precision's tolerances."""
    from polygraphy.logger import G_LOGGER

    from leanvlm.runtime.backends import make_backend
    from leanvlm.runtime.pipeline import Pipeline

    G_LOGGER.module_severity = G_LOGGER.ERROR
    engine = Pipeline.load(engine_dir, backend="onnxruntime")
    spec = engine.spec
    reference = Pipeline(spec, make_backend(spec, "torch", device="cpu"), engine.processor)
    images, prompts = sample_requests(samples, max(spec.model.image_size, 32), seed)

    # 1. prefill through Polygraphy: same feeds, both runners
    prefill_io = spec.graphs["prefill"]
    declared = {i["name"] for i in prefill_io["inputs"]}
    feeds = []
    for img, prompt in zip(images, prompts):
        b = engine.preprocess([img], [prompt])
        embeds = engine.backend.embed(b.input_ids, engine.backend.vision(b.pixel_values)[0])
        feed = {names.INPUTS_EMBEDS: embeds, names.ATTENTION_MASK: b.attention_mask,
                names.POSITION_IDS: b.position_ids, names.IMAGE_START: b.image_start}
        feeds.append({k: v for k, v in feed.items() if k in declared})
    with contextlib.redirect_stdout(sys.stderr):  # Polygraphy prints its log on stdout
        passed, ort_iters, ref_iters, logits_tol = _compare_prefill(spec, reference.backend, feeds, atol, rtol)
    max_abs = max_rel = 0.0
    kept_same = kept_total = 0
    overlap = 1.0
    for a, b in zip(ort_iters, ref_iters):
        diff = np.abs(a[names.LOGITS].astype(np.float64) - b[names.LOGITS])
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(b[names.LOGITS]), 1e-6)).max()))
        for name in a.keys():
            if names.is_index_output(name):
                kept_total += 1
                kept_same += int(np.array_equal(a[name], b[name]))
                overlap = min(overlap, index_overlap(a[name], b[name]))

    # 2. greedy decoding, engine vs reference, over `steps`
    kw = dict(max_new_tokens=min(steps, spec.limits.max_new_tokens), ignore_eos=True)
    eng = engine.generate(images=images, prompts=prompts, **kw)
    ref = reference.generate(images=images, prompts=prompts, **kw)
    same = sum(x == y for e, r in zip(eng, ref) for x, y in zip(e.token_ids, r.token_ids))
    total = sum(len(r.token_ids) for r in ref)

    # 3. reduced vs unreduced reference (same weights): what the schedule costs
    reduction = {}
    if spec.schedule.stages or spec.schedule.vision_stages:
        full_spec = spec.unreduced()
        full = Pipeline(full_spec, make_backend(full_spec, "torch", hf_model=reference.backend.ref.hf),
                        engine.processor)
        unr = full.generate(images=images, prompts=prompts, **kw)
        agree = sum(x == y for u, r in zip(unr, ref) for x, y in zip(u.token_ids, r.token_ids))
        kls = []
        for img, prompt in zip(images, prompts):
            lr = _first_logits(reference, img, prompt)
            lf = _first_logits(full, img, prompt)
            kls.append(_kl(lf, lr))
        reduction = {"greedy_agreement": agree / max(total, 1), "logit_kl_mean": float(np.mean(kls)),
                     "logit_kl_max": float(np.max(kls))}
    return ParityReport(samples, kw["max_new_tokens"], max_abs, max_rel,
                        kept_same / kept_total if kept_total else 1.0, same / max(total, 1), passed,
                        reduction, logits_tol, spec.precision.name, spec.precision.greedy_agreement, overlap,
                        spec.precision.kept_overlap)


def _compare_prefill(spec, torch_backend, feeds: list[dict], atol: float | None, rtol: float):
    """Polygraphy Comparator over the prefill graph: float outputs within the precision's tolerances (or
    `atol`), index outputs exactly as indices at fp32. At reduced precision a near tie may select another
    token, which changes every later KV entry: there the floats compared are the logits and the KV before the
    first stage, and kept indices are judged by overlap (run_parity). Returns (passed, engine iterations,
    reference iterations, logits tolerance)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IndicesCompareFunc, IterationResult, RunResults, SimpleCompareFunc

    ort_runner = OnnxrtRunner(SessionFromOnnx(str(spec.graph_path("prefill")), providers=["cpu"]))
    results = Comparator.run([ort_runner, TorchPrefillRunner(torch_backend, spec.graphs["prefill"])],
                             data_loader=feeds)

    def only(keys: set[str]) -> RunResults:
        subset = RunResults()
        for runner, iterations in results.items():
            subset.append((runner, [IterationResult({k: v for k, v in it.items() if k in keys}, it.runtime, runner)
                                    for it in iterations]))
        return subset

    precision = spec.precision
    exact = precision.kept_overlap == 1.0
    first = min((st.layer for st in spec.schedule.stages), default=spec.model.num_layers)
    (_, ort_iters), (_, ref_iters) = list(results.items())

    def compared(name: str) -> bool:
        if names.is_index_output(name):
            return False
        return exact or name == names.LOGITS or int(name.split(".")[1]) < first

    floats = [o["name"] for o in spec.graphs["prefill"]["outputs"] if compared(o["name"])]
    tolerances = {k: atol if atol is not None else precision.tolerance(k, max(float(np.abs(it[k]).max())
                                                                             for it in ref_iters))
                  for k in floats}
    passed = bool(Comparator.compare_accuracy(only(set(floats)),
                                              compare_func=SimpleCompareFunc(atol=tolerances, rtol=rtol)))
    indices = {o["name"] for o in spec.graphs["prefill"]["outputs"] if names.is_index_output(o["name"])}
    if exact and indices:
        passed &= bool(Comparator.compare_accuracy(only(indices), compare_func=IndicesCompareFunc(index_tolerance=0)))
    return passed, ort_iters, ref_iters, tolerances[names.LOGITS]


def _first_logits(pipe, image, prompt) -> np.ndarray:
    b = pipe.preprocess([image], [prompt])
    be = pipe.backend
    embeds = be.embed(b.input_ids, be.vision(b.pixel_values)[0])
    return be.prefill(embeds, b.attention_mask, b.position_ids, b.image_start)[0][0].astype(np.float64)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(P || Q) of the softmax distributions (P: unreduced, Q: reduced)."""
    lp = p_logits - p_logits.max()
    lp -= np.log(np.exp(lp).sum())
    lq = q_logits - q_logits.max()
    lq -= np.log(np.exp(lq).sum())
    return float((np.exp(lp) * (lp - lq)).sum())
