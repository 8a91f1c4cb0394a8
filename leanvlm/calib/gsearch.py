"""G-Search (arXiv 2412.00556, scenario I: cut cost, keep accuracy): from shallow to deep, the fewest image
tokens each decoder layer keeps while the calibration accuracy stays within a tolerance of the unreduced model,
counting lost answers only (`Metric.retained`): answers a cut happens to fix do not pay for answers it breaks.
On shapes-llava-8l, 500 calibration samples, tolerance 0.01, the net-accuracy criterion accepted a schedule at
96.4% (unreduced 97.4%) that answered 95.2% of the held-out questions (unreduced 97.8%): the gains it counted
were chance, picked as the luckiest of 30 candidates.

Layer l's candidates keep the counts already chosen for layers < l and cut to c at layer l, carrying c to
every later layer; c runs over a grid of counts no larger than layer l-1's (the paper's assumption that
the essential tokens do not increase with depth, so counts are non-increasing). The count of layer l-1 is
known to pass (it was the previous layer's answer), and the smallest passing count is found by bisection
on the grid, which assumes accuracy does not rise as tokens are removed at one layer (the curves we measured
are monotone up to noise; a non-monotone curve can make bisection stop at a larger count than a scan
would, never at a failing one). A stage is placed only where the count changes. Each stage ranks tokens by
the last prompt token's head-mean attention at its own layer (that layer's q and k over the tokens entering it:
score_at current, as PyramidDrop's exported stage) and renumbers positions. On shapes-llava this beat FastV's
choice (the previous layer's attention, original positions) at equal counts: 500 held-out questions, counts
144/41/6/3: 88.2% vs 84.6%, first-token KL 0.43 vs 0.80; counts 144/124/11/11: 93.8% vs 91.4%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from leanvlm.calib.scoring import Metric, Scorer
from leanvlm.errors import UserError
from leanvlm.reduction.schedule import LLMStage, Schedule

DEFAULT_STEPS = 24  # count grid: N/24, 2N/24, ..., N


@dataclass
class Candidate:
    layer: int
    count: int
    total: int  # image tokens the count is out of
    metric: Metric
    passed: bool

    @property
    def keep_str(self) -> str:
        return f"{self.count}/{self.total}"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "keep": self.count, **self.metric.to_dict(), "passed": self.passed}


@dataclass
class GSearchResult:
    schedule: Schedule
    metric: Metric  # of the chosen schedule
    baseline: Metric
    candidates: list[Candidate] = field(default_factory=list)


def check_tolerance(tolerance: float, n: int) -> None:
    """A tolerance must be >= 0 and, when positive, at least one calibration sample's worth of accuracy."""
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise UserError(f"--tolerance {tolerance}: the accepted accuracy drop, a fraction in [0, 1) (0.01 = one point)")
    if 0 < tolerance < 1 / n - 1e-12:
        raise UserError(f"--tolerance {tolerance} with --n {n}: one calibration sample is {1 / n:.3g} of accuracy, "
                        f"so this tolerance cannot be resolved (it would mean 0); use --n >= {int(-(-1 // tolerance))} "
                        "or --tolerance 0")


def count_grid(num_image_tokens: int, steps: int = DEFAULT_STEPS) -> list[int]:
    """Candidate keep counts, ascending, ending with all tokens."""
    if steps < 2:
        raise UserError(f"--steps {steps}: must be >= 2")
    return sorted({max(1, round(num_image_tokens * j / steps)) for j in range(1, steps + 1)})


def stage(layer: int, count: int, n: int) -> LLMStage:
    """A searched stage: drop to `count` at `layer`'s input, ranked by the last prompt token's attention at
    `layer` (see the module docstring), positions renumbered."""
    return LLMStage(layer=layer, num_keep=count, keep=count / n, score_at="current", positions="renumber")


def gsearch(scorer: Scorer, tolerance: float, steps: int = DEFAULT_STEPS,
            on_candidate: Callable[[Candidate], None] | None = None) -> GSearchResult:
    """Greedy shallow-to-deep search; see the module docstring."""
    check_tolerance(tolerance, len(scorer.items))
    L, N = scorer.num_layers, scorer.num_image_tokens
    threshold = scorer.baseline.accuracy - tolerance - 1e-9
    grid = count_grid(N, steps)
    stages: list[LLMStage] = []
    current, metric, tried = N, scorer.baseline, []
    for layer in range(1, L):
        options = [c for c in grid if c < current]
        lo, hi, best = 0, len(options), None  # options[hi] (or `current` when hi == len) is known to pass
        while lo < hi:
            mid = (lo + hi) // 2
            m = scorer.score(Schedule(L, N, (*stages, stage(layer, options[mid], N)), "file"))
            cand = Candidate(layer, options[mid], N, m, m.retained >= threshold)
            tried.append(cand)
            if on_candidate:
                on_candidate(cand)
            if cand.passed:
                hi, best = mid, m
            else:
                lo = mid + 1
        if hi < len(options):
            current, metric = options[hi], best
            stages.append(stage(layer, current, N))
    return GSearchResult(Schedule(L, N, tuple(stages), "file"), metric, scorer.baseline, tried)
