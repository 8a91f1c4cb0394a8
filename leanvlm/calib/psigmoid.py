"""P-Sigmoid (arXiv 2412.00556, scenario II: best accuracy within a compute budget): the keep count per
decoder layer follows a parametric sigmoid over depth, whose parameters Bayesian optimisation (optuna's TPE,
seeded) tunes for calibration accuracy under a prefill-FLOPs budget.

For decoder layer l of L, with x = l / (L - 1) and N image tokens:

    r(l) = r_min + (1 - r_min) * sigmoid(-k * (x - x0)),   keep(l) = clamp(round(N * r(l)), 1, N),  keep(0) = N

k > 0 is the steepness (large k: one FastV-like drop; small k: a gradual pyramid), x0 in [0, 1] where on the
depth the drop is centred, r_min the floor. The counts are non-increasing in l, and a stage is placed at
every layer where the count changes (scored and renumbered like G-Search's stages).

The budget B is the prefill FLOPs ratio vs unreduced of `reduction.flops` (the model `leanvlm plan` uses).
TPE proposes (k, x0); r_min is then the largest floor whose quantised schedule fits the budget (bisection:
FLOPs grow with r_min), so every trial spends the budget and the search has two dimensions, not three. When
even r_min = 0 exceeds the budget, the centre x0 moves earlier until the curve fits (a projection onto the
budget); a (k, x0) that cannot fit even so (a gentle slope under a tight budget) is scored below any trial
that fits.
The first two trials are FastV's shape (k = 40, early centre) and a pyramid's (k = 4, x0 = 0.5).
Trials are ranked by `Metric.objective` (accuracy without the answers a cut happened to fix, KL of the first
answer token breaking ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from leanvlm.calib.gsearch import stage
from leanvlm.calib.scoring import Metric, Scorer
from leanvlm.errors import UserError
from leanvlm.reduction.flops import prefill_flops_ratio
from leanvlm.reduction.schedule import Schedule

K_RANGE = (0.5, 40.0)  # steepness over normalised depth, searched log-uniformly
X0_MIN = -1.0  # how far before layer 0 a budget may move the centre (TPE proposes x0 in [0, 1])
MIN_TRIALS = 2
PYRAMID_K = 4.0  # a sigmoid this gentle falls from ~88% to ~12% of its span across the depth


@dataclass
class Trial:
    number: int
    k: float
    x0: float  # as proposed; x0_fit: after fitting the budget
    x0_fit: float | None
    r_min: float | None  # None: infeasible
    counts: list[int] | None
    flops_ratio: float | None
    metric: Metric | None

    def to_dict(self) -> dict:
        return {"trial": self.number, "k": self.k, "x0": self.x0, "x0_fit": self.x0_fit, "r_min": self.r_min, "counts": self.counts,
                "prefill_flops_ratio": self.flops_ratio, **(self.metric.to_dict() if self.metric else {})}


@dataclass
class PSigmoidResult:
    schedule: Schedule
    metric: Metric
    baseline: Metric
    best: Trial
    flops_ratio: float
    trials: list[Trial] = field(default_factory=list)


def check_budget(budget: float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UserError(f"--budget {budget}: the prefill FLOPs ratio vs unreduced, in (0, 1] (0.5 = half the FLOPs)")


def check_trials(trials: int) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < MIN_TRIALS:
        raise UserError(f"--trials {trials}: must be >= {MIN_TRIALS}")


def curve_counts(num_layers: int, n: int, k: float, x0: float, r_min: float) -> list[int]:
    """keep(l) for every decoder layer (see the module docstring); non-increasing."""
    counts, prev = [], n
    for layer in range(num_layers):
        if layer == 0:
            c = n
        else:
            x = layer / max(1, num_layers - 1)
            r = r_min + (1.0 - r_min) / (1.0 + math.exp(k * (x - x0)))
            c = min(n, max(1, round(n * r)))
        prev = min(prev, c)
        counts.append(prev)
    return counts


def counts_schedule(counts: list[int]) -> Schedule:
    """Per-layer counts -> a schedule with a stage wherever the count changes."""
    n = counts[0]
    stages = tuple(stage(layer, c, n) for layer, c in enumerate(counts) if layer and c != counts[layer - 1])
    return Schedule(len(counts), n, stages, "file")


def fit_budget(num_layers: int, n: int, k: float, x0: float, budget: float, flops):
    """Fit (k, x0) to `budget` under `flops(schedule)`: the largest r_min in [0, 1] that fits; if even r_min = 0
    does not, the centre moves earlier (the largest x0' in [X0_MIN, x0] that fits with r_min = 0).
    Returns (r_min, x0', counts), or None when neither fits."""
    def ratio(r, x):
        counts = curve_counts(num_layers, n, k, x, r)
        return flops(counts_schedule(counts)), counts

    def largest(lo, hi, fits):  # fits(lo) holds, fits(hi) does not
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    if ratio(1.0, x0)[0] <= budget:
        return 1.0, x0, ratio(1.0, x0)[1]
    if ratio(0.0, x0)[0] <= budget:
        r = largest(0.0, 1.0, lambda r: ratio(r, x0)[0] <= budget)
        return r, x0, ratio(r, x0)[1]
    if ratio(0.0, X0_MIN)[0] > budget:
        return None
    x = largest(X0_MIN, x0, lambda x: ratio(0.0, x)[0] <= budget)
    return 0.0, x, ratio(0.0, x)[1]


def psigmoid(scorer: Scorer, budget: float, trials: int, seed: int = 0, text_tokens: int | None = None,
             on_trial: Callable[[Trial], None] | None = None) -> PSigmoidResult:
    """TPE over (k, x0) with r_min fitted to the budget; the best trial's counts as a schedule."""
    try:
        import optuna
    except ImportError as e:
        raise UserError("leanvlm calib psigmoid needs optuna: pip install 'leanvlm[calib]'") from e

    check_budget(budget)
    check_trials(trials)
    L, N = scorer.num_layers, scorer.num_image_tokens
    cfg = scorer.model.model.config.text_config
    text_tokens = text_tokens or scorer.text_tokens()
    dims = (text_tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads / cfg.num_attention_heads)
    flops = lambda s: prefill_flops_ratio(s, *dims)  # noqa: E731
    floor = flops(counts_schedule([N] + [1] * (L - 1)))
    if floor > budget:
        raise UserError(f"--budget {budget}: below what any schedule reaches on this model ({floor:.3f}: layer 0 sees "
                        f"every image token, the others one each, with {text_tokens} text tokens); raise the budget")
    scored: dict[tuple, Metric] = {}  # quantised counts -> metric (different (k, x0) often quantise alike)
    done: list[Trial] = []

    def objective(t: "optuna.Trial") -> float:
        k = t.suggest_float("k", *K_RANGE, log=True)
        x0 = t.suggest_float("x0", 0.0, 1.0)
        fit = fit_budget(L, N, k, x0, budget, flops)
        if fit is None:
            trial = Trial(t.number, k, x0, None, None, None, None, None)
            value = -1.0
        else:
            r_min, x0_fit, counts = fit
            key = tuple(counts)
            if key not in scored:
                scored[key] = scorer.score(counts_schedule(counts))
            m = scored[key]
            trial = Trial(t.number, k, x0, x0_fit, r_min, counts, flops(counts_schedule(counts)), m)
            value = m.objective
        done.append(trial)
        if on_trial:
            on_trial(trial)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, trials // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    # Warm starts, the two known-good shapes: a sharp drop early in the depth (FastV's, at its default layer 2
    # of LLaVA's 32 layers) and a gentle decline centred mid-depth (PyramidDrop's staircase, smoothed)
    study.enqueue_trial({"k": K_RANGE[1], "x0": min(1.0, 1.5 / max(1, L - 1))})
    study.enqueue_trial({"k": PYRAMID_K, "x0": 0.5})
    study.optimize(objective, n_trials=trials)
    feasible = [t for t in done if t.metric is not None]
    if not feasible:
        raise UserError(f"--budget {budget}: no sigmoid curve fits it even at its floor (every layer after the first "
                        "would keep one token); raise the budget")
    # best objective; among equal objectives the cheaper, then the earlier trial
    best = max(feasible, key=lambda t: (t.metric.objective, -t.flops_ratio, -t.number))
    schedule = counts_schedule(best.counts)
    return PSigmoidResult(schedule, best.metric, scorer.baseline, best, best.flops_ratio, done)
