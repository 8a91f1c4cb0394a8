"""`leanvlm calib gsearch|psigmoid`: check the inputs, load the model and calibration data, search, write the
schedule file with its `search` record. The CLI and the benchmark tool both call these."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from leanvlm.calib.gsearch import DEFAULT_STEPS, check_tolerance, count_grid, gsearch
from leanvlm.calib.psigmoid import check_budget, check_trials, psigmoid
from leanvlm.calib.scoring import MIN_N, Scorer, search_items
from leanvlm.calib.writer import check_out, write_schedule
from leanvlm.errors import UserError

METRIC = ("greedy-answer exact-match accuracy on the calibration split (as leanvlm eval counts it) without the answers "
          "a cut happened to fix (the unreduced model's accuracy less the answers lost); ties broken by the mean "
          "KL(unreduced || candidate) of the first answer token's distribution")


@dataclass
class SearchOptions:
    model: str
    out: Path
    data: str = "shapes"
    n: int = 200
    seed: int = 0
    batch: int = 32
    force: bool = False
    reuse: bool = True  # False: score every candidate from scratch (the naive baseline of the speed benchmark)
    # gsearch
    tolerance: float = 0.01
    steps: int = DEFAULT_STEPS
    # psigmoid
    budget: float = 0.5
    trials: int = 30
    text_tokens: int | None = None  # FLOPs prompt length; default: the calibration prompts' mean


def _prepare(opts: SearchOptions):
    """Everything that can be refused is refused before the model loads."""
    from leanvlm.models import load_model

    if isinstance(opts.n, bool) or not isinstance(opts.n, int) or opts.n < MIN_N:
        raise UserError(f"--n {opts.n}: use at least {MIN_N} calibration samples")
    if opts.batch < 1:
        raise UserError(f"--batch {opts.batch}: must be >= 1")
    if opts.text_tokens is not None and opts.text_tokens < 1:
        raise UserError(f"--text-tokens {opts.text_tokens}: must be >= 1")
    check_out(opts.out, opts.force)
    items = search_items(opts.data, opts.n, opts.seed)
    loaded = load_model(opts.model)
    return Scorer(loaded, items, opts.batch, opts.reuse)


def _record(opts: SearchOptions, method: str, scorer: Scorer, schedule, metric, t0: float, **extra) -> dict:
    from leanvlm import __version__
    from leanvlm.reduction.flops import prefill_flops_ratio

    cfg = scorer.model.model.config.text_config
    text_tokens = opts.text_tokens or scorer.text_tokens()
    flops = prefill_flops_ratio(schedule, text_tokens, cfg.hidden_size, cfg.intermediate_size,
                                cfg.num_key_value_heads / cfg.num_attention_heads)
    data = (f"shapes task, calib split (seed {opts.seed}; disjoint from the test split leanvlm eval uses)"
            if str(opts.data) == "shapes" else str(opts.data))
    return {"method": method, "model": opts.model, "data": data, "n": opts.n, "seed": opts.seed, **extra,
            "metric": METRIC, "score": "last prompt token's head-mean attention at each stage's layer (score_at current), positions "
                     "renumbered",
            "unreduced_accuracy": round(scorer.baseline.accuracy, 6), "accuracy": round(metric.accuracy, 6),
            "lost": metric.lost, "gained": metric.gained, "kl": round(metric.kl, 6),
            "prefill_flops_ratio": round(flops, 6), "flops_text_tokens": text_tokens,
            "image_tokens_per_layer": schedule.image_tokens_per_layer(), "candidates_scored": scorer.stats.candidates,
            "wall_time_s": round(time.perf_counter() - t0, 1), "leanvlm": __version__}


def run_gsearch(opts: SearchOptions, on_candidate: Callable | None = None):
    """G-Search; returns (GSearchResult, record) after writing opts.out."""
    t0 = time.perf_counter()
    check_tolerance(opts.tolerance, opts.n)
    count_grid(1, opts.steps)  # validates --steps
    scorer = _prepare(opts)
    result = gsearch(scorer, opts.tolerance, opts.steps, on_candidate)
    record = _record(opts, "gsearch", scorer, result.schedule, result.metric, t0, tolerance=opts.tolerance,
                     steps=opts.steps)
    write_schedule(opts.out, result.schedule, record)
    return result, record


def run_psigmoid(opts: SearchOptions, on_trial: Callable | None = None):
    """P-Sigmoid; returns (PSigmoidResult, record) after writing opts.out."""
    t0 = time.perf_counter()
    check_budget(opts.budget)
    check_trials(opts.trials)
    scorer = _prepare(opts)
    result = psigmoid(scorer, opts.budget, opts.trials, opts.seed, opts.text_tokens, on_trial)
    best = result.best
    record = _record(opts, "psigmoid", scorer, result.schedule, result.metric, t0, budget=opts.budget,
                     trials=opts.trials, sampler=f"optuna TPE (seed {opts.seed})",
                     curve={"k": round(best.k, 6), "x0": round(best.x0_fit, 6), "r_min": round(best.r_min, 6)})
    write_schedule(opts.out, result.schedule, record)
    return result, record
