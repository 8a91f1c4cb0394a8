"""A reduction schedule: which decoder layers reduce image tokens, how they score them, how many survive.

Every count is a build-time constant, so each stage exports as constant-k TopK + Gather. A schedule comes
from a preset (`fastv`, `pdrop`) or from a YAML/JSON file:

    stages:
      - {layer: 8, keep: 0.5, score_at: current, positions: renumber}
      - {layer: 16, keep: 64}            # an int keeps that many tokens, a float that fraction of all

`keep` is a fraction of the image tokens entering the LLM (a float in (0, 1]) or a token count (an int:
`keep: 1` keeps one token, `keep: 1.0` all of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from leanvlm.errors import UserError

METHODS = ("fastv", "pdrop")
SCORE_AT = ("previous", "current")
POSITIONS = ("keep", "renumber")
_STAGE_FIELDS = {"layer", "keep", "score_at", "positions", "num_keep", "kind"}


@dataclass(frozen=True)
class LLMStage:
    """At the input of decoder `layer`, keep `num_keep` image tokens ranked by the last prompt token's
    head-mean attention: from layer `layer - 1` (`score_at="previous"`, FastV; one query row of that
    layer's attention) or recomputed with this layer's own q and k (`"current"`, PyramidDrop). Kept tokens
    keep their order; `positions` keeps their original position ids (FastV) or renumbers contiguously
    (PyramidDrop). Text tokens are always kept."""

    layer: int
    num_keep: int
    keep: float  # num_keep as a fraction of the image tokens entering the LLM (reporting)
    score_at: str = "previous"
    positions: str = "keep"
    kind: str = "llm"


# Backwards-compatible name: a FastV stage is an LLM stage scored from the previous layer.
FastVStage = LLMStage


@dataclass(frozen=True)
class Schedule:
    """Stages in layer order; `num_image_tokens` is the count entering the LLM."""

    num_layers: int
    num_image_tokens: int
    stages: tuple[LLMStage, ...] = ()
    method: str = "none"

    def __post_init__(self):
        validate(self)

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def fastv(cls, num_layers: int, num_image_tokens: int, keep: float, layer: int = 2) -> "Schedule":
        """One FastV stage at `layer` keeping `keep` of the image tokens; keep == 1 gives no stage."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, ())
        if not 1 <= layer <= num_layers - 1:
            raise UserError(
                f"--layer {layer}: must be in [1, {num_layers - 1}] for a model with {num_layers} decoder layers "
                "(tokens are dropped at the input of that layer, scored by the layer before)"
            )
        stage = LLMStage(layer=layer, num_keep=_count(keep, num_image_tokens, "--keep"), keep=float(keep))
        return cls(num_layers, num_image_tokens, (stage,), "fastv")

    @classmethod
    def pdrop(cls, num_layers: int, num_image_tokens: int, keep: float) -> "Schedule":
        """PyramidDrop: drops at 1/4, 1/2 and 3/4 of the depth keeping lambda, lambda^2, lambda^3 with
        lambda = keep^(1/3), so keep 0.125 gives the paper's LLaVA-1.5 schedule (layers 8/16/24 of 32 keeping
        0.5/0.25/0.125). Scores are recomputed from each drop layer's own q and k; positions renumbered."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, ())
        layers = sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
        if len(layers) < 3 or layers[-1] >= num_layers:
            raise UserError(f"--method pdrop needs at least 4 decoder layers (model has {num_layers})")
        lam = keep ** (1 / 3)
        stages = tuple(
            LLMStage(layer=l, num_keep=_count(lam ** (j + 1), num_image_tokens, "--keep"), keep=lam ** (j + 1),
                     score_at="current", positions="renumber")
            for j, l in enumerate(layers))
        return cls(num_layers, num_image_tokens, stages, "pdrop")

    @classmethod
    def preset(cls, method: str, num_layers: int, num_image_tokens: int, keep: float, layer: int = 2) -> "Schedule":
        if method == "fastv":
            return cls.fastv(num_layers, num_image_tokens, keep, layer)
        if method == "pdrop":
            return cls.pdrop(num_layers, num_image_tokens, keep)
        raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int, num_image_tokens: int) -> "Schedule":
        """Read a YAML or JSON schedule file (see the module docstring)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--schedule {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"--schedule {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise UserError(f"--schedule {path}: expected a mapping with a 'stages' list")
        stages = []
        for i, raw in enumerate(data["stages"]):
            where = f"--schedule {path}: stage {i}"
            if not isinstance(raw, dict):
                raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
            unknown = set(raw) - _STAGE_FIELDS
            if unknown:
                raise UserError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_STAGE_FIELDS - {'kind', 'num_keep'})}")
            if "layer" not in raw or "keep" not in raw:
                raise UserError(f"{where}: needs 'layer' and 'keep'")
            layer, keep = raw["layer"], raw["keep"]
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise UserError(f"{where}: layer {layer!r} is not an integer")
            if isinstance(keep, bool) or not isinstance(keep, (int, float)):
                raise UserError(f"{where}: keep {keep!r} is not a number")
            if isinstance(keep, int):  # an int is a token count, a float a fraction (1 != 1.0)
                num_keep = keep
            else:
                if not 0 < keep <= 1:
                    raise UserError(f"{where}: keep {keep} must be a fraction in (0, 1] or a token count")
                num_keep = round(keep * num_image_tokens)
            stages.append(LLMStage(layer=layer, num_keep=num_keep, keep=num_keep / num_image_tokens,
                                   score_at=raw.get("score_at", "previous"), positions=raw.get("positions", "keep")))
        return cls(num_layers, num_image_tokens, tuple(stages), "file")

    # ---- structure ---------------------------------------------------------------------------
    def stage_at(self, layer: int) -> LLMStage | None:
        """The stage that acts at the input of `layer`, if any."""
        return next((s for s in self.stages if s.layer == layer), None)

    def scores_at(self, layer: int) -> LLMStage | None:
        """The stage whose score is taken from `layer`'s attention (score_at previous: the layer before)."""
        return next((s for s in self.stages if s.score_at == "previous" and s.layer - 1 == layer), None)

    @property
    def groups(self) -> list[tuple[int, int, int]]:
        """Cache groups: (first layer, last layer + 1, image tokens) for each run of layers sharing a KV length."""
        bounds = [0, *[s.layer for s in self.stages], self.num_layers]
        counts = [self.num_image_tokens, *[s.num_keep for s in self.stages]]
        return [(bounds[i], bounds[i + 1], counts[i]) for i in range(len(counts))]

    def group_of(self, layer: int) -> int:
        """Index of the cache group holding `layer`."""
        return next(g for g, (a, b, _) in enumerate(self.groups) if a <= layer < b)

    def image_tokens_per_layer(self) -> list[int]:
        """How many image tokens each decoder layer processes."""
        return [n for a, b, n in self.groups for _ in range(a, b)]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_image_tokens": self.num_image_tokens, "method": self.method,
                "stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        stages = []
        for s in d.get("stages", []):
            if s.get("kind", "llm") not in ("llm", "fastv"):
                raise UserError(f"schedule stage kind {s.get('kind')!r} is not supported by this version")
            stages.append(LLMStage(layer=int(s["layer"]), num_keep=int(s["num_keep"]), keep=float(s["keep"]),
                                   score_at=s.get("score_at", "previous"), positions=s.get("positions", "keep")))
        return cls(int(d["num_layers"]), int(d["num_image_tokens"]), tuple(stages), d.get("method", "none"))


def validate(schedule: Schedule) -> None:
    """Raise UserError naming the stage and field of the first problem."""
    prev_layer, prev_count = 0, schedule.num_image_tokens
    for i, s in enumerate(schedule.stages):
        where = f"schedule stage {i} (layer {s.layer})"
        if not 1 <= s.layer <= schedule.num_layers - 1:
            raise UserError(f"{where}: layer {s.layer} does not exist for reduction; use 1..{schedule.num_layers - 1} "
                            f"(the model has {schedule.num_layers} decoder layers)")
        if s.layer <= prev_layer:
            raise UserError(f"{where}: layer must be after the previous stage's layer {prev_layer}")
        if s.num_keep < 1:
            raise UserError(f"{where}: keep rounds to 0 of {schedule.num_image_tokens} image tokens")
        if s.num_keep > prev_count:
            raise UserError(f"{where}: keep {s.num_keep} tokens would increase the count ({prev_count} before it)")
        if s.score_at not in SCORE_AT:
            raise UserError(f"{where}: score_at {s.score_at!r}: choose one of {', '.join(SCORE_AT)}")
        if s.positions not in POSITIONS:
            raise UserError(f"{where}: positions {s.positions!r}: choose one of {', '.join(POSITIONS)}")
        prev_layer, prev_count = s.layer, s.num_keep


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise UserError(f"--keep {keep}: must be in (0, 1] (the fraction of image tokens kept)")


def _count(fraction: float, n: int, flag: str) -> int:
    k = round(n * fraction)
    if k < 1:
        raise UserError(f"{flag} {fraction:g}: keeps {n} x {fraction:g} -> 0 of {n} image tokens; "
                        f"use at least {1 / n:.4g}")
    return k
