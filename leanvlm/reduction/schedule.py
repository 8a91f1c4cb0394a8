"""A reduction schedule: which decoder layers drop image tokens, and how many survive (build-time constants)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from leanvlm.errors import UserError


@dataclass(frozen=True)
class FastVStage:
    """FastV: at the input of decoder `layer`, keep `num_keep` image tokens ranked by the last prompt
    token's head-mean attention in layer `layer - 1` (one query row). Kept tokens keep order and positions."""

    layer: int
    keep: float
    num_keep: int
    kind: str = field(default="fastv", init=False)


@dataclass(frozen=True)
class Schedule:
    """Stages in layer order; `num_image_tokens` is the count entering the LLM."""

    num_layers: int
    num_image_tokens: int
    stages: tuple[FastVStage, ...] = ()

    @classmethod
    def fastv(cls, num_layers: int, num_image_tokens: int, keep: float, layer: int = 2) -> "Schedule":
        """One FastV stage at `layer` keeping `keep` of the image tokens; keep == 1 gives no stage."""
        if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise UserError(f"--keep {keep}: must be in (0, 1] (the fraction of image tokens kept)")
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, ())
        if not 1 <= layer <= num_layers - 1:
            raise UserError(
                f"--layer {layer}: must be in [1, {num_layers - 1}] for a model with {num_layers} decoder layers "
                "(tokens are dropped at the input of that layer, scored by the layer before)"
            )
        num_keep = round(num_image_tokens * keep)
        if num_keep < 1:
            raise UserError(
                f"--keep {keep}: keeps {num_image_tokens} x {keep} -> 0 of {num_image_tokens} image tokens; "
                f"use at least {1 / num_image_tokens:.4g}"
            )
        return cls(num_layers, num_image_tokens, (FastVStage(layer=layer, keep=float(keep), num_keep=num_keep),))

    def stage_at(self, layer: int) -> FastVStage | None:
        """The stage that acts at the input of `layer`, if any."""
        return next((s for s in self.stages if s.layer == layer), None)

    def scores_at(self, layer: int) -> FastVStage | None:
        """The stage whose score is taken from `layer`'s attention (FastV: the layer before the stage)."""
        return next((s for s in self.stages if s.layer - 1 == layer), None)

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
        return {
            "num_layers": self.num_layers,
            "num_image_tokens": self.num_image_tokens,
            "stages": [asdict(s) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        stages = []
        for s in d.get("stages", []):
            if s.get("kind") != "fastv":
                raise UserError(f"schedule stage kind {s.get('kind')!r} is not supported by this version")
            stages.append(FastVStage(layer=int(s["layer"]), keep=float(s["keep"]), num_keep=int(s["num_keep"])))
        return cls(int(d["num_layers"]), int(d["num_image_tokens"]), tuple(stages))
