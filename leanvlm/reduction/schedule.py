"""A reduction schedule: where image tokens are reduced, how they are scored, how many survive.

Every count is a build-time constant, so each stage exports as constant-k TopK + Gather (+ merge
arithmetic). A schedule comes from a preset (`fastv`, `pdrop`, `illava`, `visionzip`) or a YAML/JSON file:

    stages:
      - {where: vision, layer: 5, keep: 0.8}                  # iLLaVA merge inside ViT layer 5
      - {where: projector, keep: 64, contextual: 10}          # VisionZip before the LLM
      - {layer: 8, keep: 0.5, score_at: current, positions: renumber}   # an LLM stage (where: llm)
      - {layer: 16, keep: 24, action: merge}
      - {layer: 2, kind: adaptive, cap: 0.5, min: 9, spatial: 9}   # ATP-style, per-sample count (reduction.atp)

An `adaptive` stage (LLM layers only) keeps a data-dependent number of image tokens per sample, predicted by a
trained ATP module (leanvlm/reduction/atp.py) and clamped to [min, cap]; `cap` is the build-time bound that sizes
the KV cache, `spatial` tokens on a uniform grid are always kept (spatial augmented pruning), and `static: true`
always runs K = cap tokens (masking only) for targets that need static shapes.

`keep` is a fraction of the image tokens out of the vision tower (a float in (0, 1]) or a token count (an
int: `keep: 1` keeps one token, `keep: 1.0` all of them). An optional top-level `search` mapping records how
a searched schedule was found (`leanvlm calib`); it does not change the schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from leanvlm.errors import UserError
from leanvlm.spec import defaults

FIXED_METHODS = ("fastv", "pdrop", "illava", "visionzip")  # presets with build-time counts, any checkpoint
METHODS = (*FIXED_METHODS, "adaptive")  # adaptive: needs the checkpoint's trained ATP modules
SCORE_AT = ("previous", "current")
DECODE_POSITIONS = ("group", "prompt")
POSITIONS = ("keep", "renumber")
LLM_ACTIONS = ("drop", "merge")
# where -> (allowed scores, allowed actions); the first of each is the default
PLACES = {
    "llm": (("last_token", "mean_received"), LLM_ACTIONS),
    "vision": (("mean_received",), ("merge",)),
    "projector": (("cls",), ("visionzip",)),
}
_STAGE_FIELDS = {"where", "layer", "keep", "score", "action", "score_at", "positions", "contextual", "keep_cls",
                 "kind", "cap", "min", "spatial", "static"}
ADAPTIVE_FIELDS = ("cap", "min", "spatial", "static")
_FILE_FIELDS = {"stages", "decode_positions", "search"}  # search: provenance (leanvlm calib), not read
VISIONZIP_KEEP_CLS = True  # the reference code sends CLS to the LLM as one of its dominant tokens


@dataclass(frozen=True)
class LLMStage:
    """At the input of decoder `layer`, keep `num_keep` image tokens ranked by the last prompt token's
    head-mean attention: from layer `layer - 1` (`score_at="previous"`, FastV; one query row of that
    layer's attention) or recomputed with this layer's own q and k (`"current"`, PyramidDrop). Kept tokens
    keep their order; `positions` keeps their original position ids (FastV) or renumbers contiguously
    (PyramidDrop). Text tokens are always kept."""

    layer: int
    num_keep: int
    keep: float  # num_keep as a fraction of the vision tower's image tokens (reporting)
    score_at: str = "previous"
    positions: str = "keep"
    action: str = "drop"  # or "merge": iLLaVA's rank-weighted merge of the removed tokens into one kept
    score: str = "last_token"  # or "mean_received": attention each token receives, mean over all queries
    kind: str = "llm"  # or "adaptive": num_keep is the cap, the kept count is per sample (reduction.atp)
    min_keep: int = 0  # adaptive: the smallest per-sample count
    spatial: int = 0  # adaptive: tokens on a uniform grid always kept (SAP), counted in the kept count
    static: bool = False  # adaptive: always K = cap (masking only) instead of K = the batch's largest count

    @property
    def adaptive(self) -> bool:
        return self.kind == "adaptive"

    @property
    def merges(self) -> bool:
        """Whether the stage reports merge targets (tokens that absorbed removed ones)."""
        return self.action == "merge"


@dataclass(frozen=True)
class VisionStage:
    """A stage before the LLM. kind "vit_merge" (iLLaVA): inside ViT layer `layer`, after attention and
    before the MLP, merge the patch tokens receiving the least attention (mean over queries and heads) down to
    `num_keep` with rank weights. kind "visionzip": on the feature layer's output, keep `num_keep - contextual`
    dominant tokens by CLS attention and `contextual` merged tokens by key similarity; with `keep_cls` (the
    reference code's behaviour) the CLS token is one of the dominant tokens and goes to the LLM first."""

    kind: str
    num_keep: int
    keep: float
    layer: int = -1  # ViT layer for vit_merge; -1: the feature layer (visionzip)
    contextual: int = 0
    keep_cls: bool = False  # visionzip: the CLS token is one of the dominant tokens sent to the LLM (reference)

    @property
    def dominant_patches(self) -> int:
        """visionzip: patch tokens kept by CLS attention (the dominant count less CLS when it is kept)."""
        return self.num_keep - self.contextual - int(self.keep_cls)

    @property
    def merges(self) -> bool:
        """Whether the stage reports merge targets (tokens that absorbed removed ones)."""
        return self.kind == "vit_merge" or self.contextual > 0



@dataclass(frozen=True)
class Schedule:
    """Stages in layer order; `num_image_tokens` is the count entering the LLM."""

    num_layers: int
    num_image_tokens: int  # patch tokens out of the vision tower
    stages: tuple[LLMStage, ...] = ()
    method: str = "none"
    vision_stages: tuple[VisionStage, ...] = ()
    vision_layers: int = 0  # encoder layers run up to the feature layer (bounds vit_merge layers)
    # Decode-time position ids of layers after a renumbering stage: "group" continues after the group's own
    # renumbered prompt (PyramidDrop's reference code), "prompt" after the full prompt in every group.
    decode_positions: str = "group"

    @property
    def llm_image_tokens(self) -> int:
        """Image tokens entering the LLM (after the vision stages)."""
        return self.vision_stages[-1].num_keep if self.vision_stages else self.num_image_tokens

    def __post_init__(self):
        validate(self)

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def fastv(cls, num_layers: int, num_image_tokens: int, keep: float,
              layer: int = defaults.FASTV_LAYER) -> "Schedule":
        """One FastV stage at `layer` keeping `keep` of the image tokens; keep == 1 gives no stage."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, ())
        if not 1 <= layer <= num_layers - 1:
            raise UserError(
                f"--layer {layer}: must be in [1, {num_layers - 1}] for a model with {num_layers} decoder layers "
                "(tokens are dropped at the input of that layer, scored by the layer before)"
            )
        k = _count(keep, num_image_tokens, "--keep")
        stage = LLMStage(layer=layer, num_keep=k, keep=k / num_image_tokens)
        return cls(num_layers, num_image_tokens, (stage,), "fastv")

    @classmethod
    def pdrop(cls, num_layers: int, num_image_tokens: int, keep: float) -> "Schedule":
        """PyramidDrop: drops at 1/4, 1/2 and 3/4 of the depth keeping int(N * lambda^j) for j = 1, 2, 3 with
        lambda = keep^(1/3), so keep 0.125 gives the paper's LLaVA-1.5 schedule (layers 8/16/24 of 32 keeping
        288/144/72 of 576). Scores are recomputed from each drop layer's own q and k; positions renumbered, and
        decode tokens numbered after each group's renumbered prompt (decode_positions "group"), as the
        reference code (Cooperx521/PyramidDrop) does."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, ())
        layers = sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
        if len(layers) < 3 or layers[-1] >= num_layers:
            raise UserError(f"--method pdrop needs at least 4 decoder layers (model has {num_layers})")
        lam = keep ** (1 / 3)
        # the reference code truncates: int(N * ratio) for the cumulative ratios lambda, lambda^2, lambda^3
        counts = [_count(lam ** (j + 1), num_image_tokens, "--keep", truncate=True) for j in range(3)]
        stages = tuple(LLMStage(layer=l, num_keep=k, keep=k / num_image_tokens, score_at="current", positions="renumber")
                       for l, k in zip(layers, counts))
        return cls(num_layers, num_image_tokens, stages, "pdrop")

    @classmethod
    def visionzip(cls, num_layers: int, num_image_tokens: int, keep: float, vision_layers: int = 0,
                  keep_cls: bool = VISIONZIP_KEEP_CLS) -> "Schedule":
        """VisionZip before the LLM: keep * N tokens, of which 10/64 contextual (the paper's 54 + 10 of 576 at
        keep 64/576); with keep_cls (the reference code) CLS is one of the dominant tokens: 53 patches + CLS."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, vision_layers=vision_layers)
        total = _count(keep, num_image_tokens, "--keep")
        keep_cls = keep_cls and total >= 2  # one token is one patch
        stage = VisionStage("visionzip", num_keep=total, keep=total / num_image_tokens,
                            contextual=_visionzip_contextual(total, keep_cls), keep_cls=keep_cls)
        return cls(num_layers, num_image_tokens, (), "visionzip", (stage,), vision_layers)

    @classmethod
    def illava(cls, num_layers: int, num_image_tokens: int, keep: float, vision_layers: int) -> "Schedule":
        """iLLaVA adapted to LLaVA-1.5 (the reference code targets LLaVA-OneVision's 27-layer SigLIP, 729
        tokens): rank-weighted merges in ViT layers at 5/26..8/26 of the encoder depth (its layers 5-8), then
        one LLM merge stage at 8/28 of the decoder depth keeping 0.7 (its layer 8 of Qwen2's 28). The ViT
        merges take the patches to keep/0.7 of N in four equal steps, so `keep` of N reach the LLM's later
        layers (the paper's default is keep ~0.35: 729 -> 361 -> 253)."""
        _check_keep(keep)
        if keep == 1.0:
            return cls(num_layers, num_image_tokens, vision_layers=vision_layers)
        final = _count(keep, num_image_tokens, "--keep")
        llm_in = min(num_image_tokens, max(final, round(final / 0.7)))
        vit_layers = sorted({min(vision_layers - 1, round(vision_layers * f / 26)) for f in (5, 6, 7, 8)})
        steps, count, vstages = len(vit_layers), num_image_tokens, []
        for j, layer in enumerate(vit_layers):
            count = num_image_tokens - round((num_image_tokens - llm_in) * (j + 1) / steps)
            vstages.append(VisionStage("vit_merge", num_keep=count, keep=count / num_image_tokens, layer=layer))
        vstages = [v for v in vstages if v.num_keep < num_image_tokens]
        stages = ()
        if final < llm_in:
            llm_layer = max(1, min(num_layers - 1, round(num_layers * 8 / 28)))
            stages = (LLMStage(layer=llm_layer, num_keep=final, keep=final / num_image_tokens, action="merge"),)
        return cls(num_layers, num_image_tokens, stages, "illava", tuple(vstages), vision_layers)

    @classmethod
    def adaptive(cls, num_layers: int, num_image_tokens: int, stages: list[dict], keep: float | None = None,
                 static: bool = False) -> "Schedule":
        """Adaptive (ATP-style) stages at the layers of a trained ATP record (`stages`: layer, cap, min, spatial
        per stage, as reduction.atp writes them); `keep` replaces every stage's cap by that fraction of the
        image tokens (not below its min), `static` always runs K = cap."""
        if keep is not None:
            _check_keep(keep)
        out = []
        for st in stages:
            cap = int(st["cap"]) if keep is None else max(int(st["min"]), _count(keep, num_image_tokens, "--keep"))
            out.append(adaptive_stage(int(st["layer"]), cap, int(st["min"]), int(st["spatial"]), static,
                                      num_image_tokens))
        return cls(num_layers, num_image_tokens, tuple(out), "adaptive")

    @classmethod
    def preset(cls, method: str, num_layers: int, num_image_tokens: int, keep: float,
               layer: int = defaults.FASTV_LAYER, vision_layers: int = 0) -> "Schedule":
        """The schedule of a named method (see each constructor for its defaults and sources)."""
        if method == "fastv":
            s = cls.fastv(num_layers, num_image_tokens, keep, layer)
        elif method == "pdrop":
            s = cls.pdrop(num_layers, num_image_tokens, keep)
        elif method == "visionzip":
            return cls.visionzip(num_layers, num_image_tokens, keep, vision_layers)
        elif method == "illava":
            return cls.illava(num_layers, num_image_tokens, keep, vision_layers)
        elif method == "adaptive":
            raise UserError("--method adaptive takes its stages from the model's trained ATP modules "
                            "(leanvlm.reduction.atp.adaptive_schedule)")
        else:
            raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")
        return replace(s, vision_layers=vision_layers)

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int, num_image_tokens: int, vision_layers: int = 0) -> "Schedule":
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
        unknown = set(data) - _FILE_FIELDS
        if unknown:
            raise UserError(f"--schedule {path}: unknown top-level field(s) {sorted(unknown)}; known: "
                            f"{sorted(_FILE_FIELDS)}")
        if not isinstance(data.get("search", {}), dict):
            raise UserError(f"--schedule {path}: 'search' must be a mapping (the record of a leanvlm calib search)")
        decode_positions = data.get("decode_positions", "group")
        if decode_positions not in DECODE_POSITIONS:
            raise UserError(f"--schedule {path}: decode_positions {decode_positions!r}: choose one of "
                            f"{', '.join(DECODE_POSITIONS)}")
        llm, vision = [], []
        for i, raw in enumerate(data["stages"]):
            stage = _parse_stage(raw, f"--schedule {path}: stage {i}", num_image_tokens)
            (vision if isinstance(stage, VisionStage) else llm).append(stage)
            if isinstance(stage, VisionStage) and llm:
                raise UserError(f"--schedule {path}: stage {i}: a {raw.get('where')} stage cannot follow LLM stages")
        return cls(num_layers, num_image_tokens, tuple(llm), "file", tuple(vision), vision_layers, decode_positions)

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
        counts = [self.llm_image_tokens, *[s.num_keep for s in self.stages]]
        return [(bounds[i], bounds[i + 1], counts[i]) for i in range(len(counts))]

    def group_of(self, layer: int) -> int:
        """Index of the cache group holding `layer`."""
        return next(g for g, (a, b, _) in enumerate(self.groups) if a <= layer < b)

    def decode_position_offsets(self) -> list[int]:
        """Per cache group: what decode subtracts from the full-prompt position of a new token. Non-zero only
        for groups after a renumbering stage with decode_positions "group": the image tokens dropped up to
        the last renumbering, so new tokens follow the group's renumbered prompt without a gap."""
        offsets, offset = [0], 0
        for s in self.stages:
            if s.positions == "renumber" and self.decode_positions == "group":
                offset = self.llm_image_tokens - s.num_keep
            offsets.append(offset)
        return offsets

    def image_tokens_per_layer(self) -> list[int]:
        """How many image tokens each decoder layer processes."""
        return [n for a, b, n in self.groups for _ in range(a, b)]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_image_tokens": self.num_image_tokens, "method": self.method,
                "vision_layers": self.vision_layers, "llm_image_tokens": self.llm_image_tokens,
                "decode_positions": self.decode_positions,
                "vision_stages": [asdict(s) for s in self.vision_stages], "stages": [_stage_dict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """Inverse of to_dict (a manifest's resolved schedule)."""
        try:
            stages = tuple(LLMStage(**{k: v for k, v in s.items() if k != "kind" or v == "adaptive"})
                           for s in d.get("stages", []))
            vision = tuple(VisionStage(**s) for s in d.get("vision_stages", []))
            # engines written before decode_positions existed numbered decode tokens after the full prompt
            return cls(int(d["num_layers"]), int(d["num_image_tokens"]), stages, d.get("method", "none"), vision,
                       int(d.get("vision_layers", 0)), d.get("decode_positions", "prompt"))
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(f"schedule record is malformed or from an unsupported version ({e})") from e


def _stage_dict(stage: LLMStage) -> dict:
    """A stage's record; the adaptive fields only on adaptive stages (fixed stages' records are unchanged)."""
    d = asdict(stage)
    if not stage.adaptive:
        for f in ("min_keep", "spatial", "static"):
            d.pop(f)
    return d


def _parse_stage(raw, where: str, n: int):
    """One schedule-file stage -> LLMStage or VisionStage, or a UserError naming the stage and field."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _STAGE_FIELDS
    if unknown:
        raise UserError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_STAGE_FIELDS)}")
    place = raw.get("where", "llm")
    if place not in PLACES:
        raise UserError(f"{where}: where {place!r}: choose one of {', '.join(PLACES)}")
    kind = raw.get("kind", "llm")
    if kind not in ("llm", "adaptive"):
        raise UserError(f"{where}: kind {kind!r}: choose adaptive (or leave it out)")
    if kind == "adaptive":
        if place != "llm":
            raise UserError(f"{where}: an adaptive stage acts between LLM decoder layers (its importance is the text's "
                            f"attention to the image tokens); where {place!r} is not possible, use where: llm")
        return _parse_adaptive(raw, where, n)
    for f in ADAPTIVE_FIELDS:
        if f in raw:
            raise UserError(f"{where}: {f} is a field of adaptive stages (kind: adaptive)")
    scores, actions = PLACES[place]
    score, action = raw.get("score", scores[0]), raw.get("action", actions[0])
    if score not in scores:
        other = next((p for p, (sc, _) in PLACES.items() if score in sc), None)
        hint = f" ({score} is a score of {other} stages)" if other else ""
        raise UserError(f"{where}: score {score!r} is not available where {place}{hint}; use {', '.join(scores)}")
    if action not in actions:
        raise UserError(f"{where}: action {action!r} is not available where {place}; use {', '.join(actions)}")
    needs = ("keep",) if place == "projector" else ("layer", "keep")
    if any(f not in raw for f in needs):
        raise UserError(f"{where}: needs {' and '.join(repr(f) for f in needs)}")
    keep = raw["keep"]
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise UserError(f"{where}: keep {keep!r} is not a number")
    if isinstance(keep, int):  # an int is a token count, a float a fraction (1 != 1.0)
        num_keep = keep
    elif not 0 < keep <= 1:
        raise UserError(f"{where}: keep {keep} must be a fraction in (0, 1] or a token count")
    else:
        num_keep = round(keep * n)
    layer = raw.get("layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UserError(f"{where}: layer {layer!r} is not an integer")
    if place != "projector":
        for f in ("contextual", "keep_cls"):
            if f in raw:
                raise UserError(f"{where}: {f} is a field of projector stages, not {place} stages")
    if place == "llm":
        return LLMStage(layer=layer, num_keep=num_keep, keep=num_keep / n, score_at=raw.get("score_at", "previous"),
                        positions=raw.get("positions", "keep"), action=action, score=score)
    for f in ("score_at", "positions"):
        if f in raw:
            raise UserError(f"{where}: {f} is a field of llm stages, not {place} stages")
    if place == "vision":
        return VisionStage("vit_merge", num_keep=num_keep, keep=num_keep / n, layer=layer)
    keep_cls = raw.get("keep_cls", VISIONZIP_KEEP_CLS)
    if not isinstance(keep_cls, bool):
        raise UserError(f"{where}: keep_cls {keep_cls!r} must be true or false")
    contextual = raw.get("contextual", _visionzip_contextual(num_keep, keep_cls))
    if isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0:
        raise UserError(f"{where}: contextual {contextual!r} must be a non-negative integer")
    return VisionStage("visionzip", num_keep=num_keep, keep=num_keep / n, contextual=contextual, keep_cls=keep_cls)


def _parse_adaptive(raw: dict, where: str, n: int) -> LLMStage:
    """An adaptive stage: {layer, cap, min, spatial, static}; cap and min are counts (int) or fractions (float)."""
    for f in ("keep", "score", "action", "score_at", "positions", "contextual", "keep_cls"):
        if f in raw:
            raise UserError(f"{where}: {f} is not a field of adaptive stages (they take layer, cap, min, spatial, "
                            "static)")
    if "layer" not in raw or "cap" not in raw:
        raise UserError(f"{where}: an adaptive stage needs 'layer' and 'cap'")
    layer = raw["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UserError(f"{where}: layer {layer!r} is not an integer")
    spatial = raw.get("spatial", 0)
    if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 0:
        raise UserError(f"{where}: spatial {spatial!r} must be a non-negative integer (tokens on a uniform grid)")
    static = raw.get("static", False)
    if not isinstance(static, bool):
        raise UserError(f"{where}: static {static!r} must be true or false")
    cap = _stage_count(raw["cap"], n, f"{where}: cap")
    low = _stage_count(raw.get("min", max(spatial, 1)), n, f"{where}: min")
    return adaptive_stage(layer, cap, low, spatial, static, n)


def adaptive_stage(layer: int, cap: int, min_keep: int, spatial: int, static: bool, n: int) -> LLMStage:
    """An adaptive LLMStage (checked by validate: cap >= min >= spatial >= 0)."""
    return LLMStage(layer=layer, num_keep=cap, keep=cap / n, kind="adaptive", min_keep=min_keep, spatial=spatial,
                    static=static)


def _stage_count(value, n: int, what: str) -> int:
    """A token count (int) or a fraction of n (float in (0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} {value!r} is not a number")
    if isinstance(value, int):
        return value
    if not 0 < value <= 1:
        raise UserError(f"{what} {value} must be a fraction in (0, 1] or a token count")
    return max(1, round(value * n))


def validate(schedule: Schedule) -> None:
    """Raise UserError naming the stage and field of the first problem."""
    if schedule.decode_positions not in DECODE_POSITIONS:
        raise UserError(f"schedule decode_positions {schedule.decode_positions!r}: choose one of "
                        f"{', '.join(DECODE_POSITIONS)}")
    count = schedule.num_image_tokens
    prev_vit = -1
    for i, v in enumerate(schedule.vision_stages):
        where = f"schedule vision stage {i} ({v.kind}{f' at ViT layer {v.layer}' if v.kind == 'vit_merge' else ''})"
        if v.kind == "vit_merge":
            if schedule.vision_layers and not 0 <= v.layer < schedule.vision_layers:
                raise UserError(f"{where}: layer {v.layer} does not exist; the encoder runs layers "
                                f"0..{schedule.vision_layers - 1} up to its feature layer")
            if v.layer <= prev_vit:
                raise UserError(f"{where}: layer must be after the previous vision stage's layer {prev_vit}")
            prev_vit = v.layer
        elif v.kind == "visionzip":
            if i != len(schedule.vision_stages) - 1:
                raise UserError(f"{where}: visionzip acts on the encoder output and must be the last vision stage")
            if v.contextual < 0 or v.dominant_patches < 1:
                cls_note = " besides CLS" if v.keep_cls else ""
                raise UserError(f"{where}: contextual {v.contextual} must leave at least one dominant patch token"
                                f"{cls_note} of {v.num_keep}")
        else:
            raise UserError(f"{where}: unknown kind {v.kind!r}")
        if v.keep_cls and v.kind != "visionzip":
            raise UserError(f"{where}: keep_cls is a field of visionzip stages")
        _check_count(where, v.num_keep, count, schedule.num_image_tokens)
        count = v.num_keep
    prev_layer = 0
    for i, s in enumerate(schedule.stages):
        where = f"schedule stage {i} (layer {s.layer})"
        if not 1 <= s.layer <= schedule.num_layers - 1:
            raise UserError(f"{where}: layer {s.layer} does not exist for reduction; use 1..{schedule.num_layers - 1} "
                            f"(the model has {schedule.num_layers} decoder layers)")
        if s.layer <= prev_layer:
            raise UserError(f"{where}: layer must be after the previous stage's layer {prev_layer}")
        _check_count(where, s.num_keep, count, schedule.num_image_tokens)
        if s.score_at not in SCORE_AT:
            raise UserError(f"{where}: score_at {s.score_at!r}: choose one of {', '.join(SCORE_AT)}")
        if s.positions not in POSITIONS:
            raise UserError(f"{where}: positions {s.positions!r}: choose one of {', '.join(POSITIONS)}")
        if s.action not in LLM_ACTIONS:
            raise UserError(f"{where}: action {s.action!r}: choose one of {', '.join(LLM_ACTIONS)}")
        if s.score not in PLACES["llm"][0]:
            raise UserError(f"{where}: score {s.score!r}: choose one of {', '.join(PLACES['llm'][0])}")
        if s.score == "mean_received" and s.score_at != "previous":
            raise UserError(f"{where}: score mean_received is taken from the previous layer's attention; "
                            "use score_at: previous")
        if not s.adaptive and any(t.adaptive for t in schedule.stages[:i]):
            raise UserError(f"{where}: a fixed-count stage cannot follow an adaptive one (its count would include "
                            "the tokens the adaptive stage masked); put it before, or make it adaptive")
        if s.adaptive and schedule.vision_stages:
            raise UserError(f"{where}: adaptive stages need the vision tower's full token grid (no vision or "
                            "projector stage before them)")
        if s.kind not in ("llm", "adaptive"):
            raise UserError(f"{where}: kind {s.kind!r}: choose llm or adaptive")
        if s.adaptive:
            if s.min_keep > s.num_keep:
                raise UserError(f"{where}: cap {s.num_keep} < min {s.min_keep}; the cap bounds every sample's count "
                                "from above, so raise cap or lower min")
            if s.min_keep < 1:
                raise UserError(f"{where}: min {s.min_keep} must keep at least one image token")
            if s.spatial > s.min_keep:
                raise UserError(f"{where}: spatial {s.spatial} > min {s.min_keep}: the spatial tokens are always "
                                "kept, so min must be at least spatial")
            if s.action != "drop" or s.score_at != "previous" or s.positions != "keep" or s.score != "last_token":
                raise UserError(f"{where}: adaptive stages drop tokens scored by the previous layer's last-token "
                                "attention and keep their positions")
        elif s.min_keep or s.spatial or s.static:
            raise UserError(f"{where}: min/spatial/static are fields of adaptive stages")
        prev_layer, count = s.layer, s.num_keep


def _check_count(where: str, keep: int, before: int, total: int) -> None:
    if keep < 1:
        raise UserError(f"{where}: keep rounds to 0 of {total} image tokens")
    if keep > before:
        raise UserError(f"{where}: keep {keep} tokens would increase the count ({before} before it)")


def _visionzip_contextual(total: int, keep_cls: bool = False) -> int:
    """VisionZip's contextual share: 10 of 64 tokens (its 54 + 10 default), leaving at least one dominant patch."""
    return max(0, min(round(total * 10 / 64), total - 1 - int(keep_cls)))


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise UserError(f"--keep {keep}: must be in (0, 1] (the fraction of image tokens kept)")


def _count(fraction: float, n: int, flag: str, truncate: bool = False) -> int:
    """Tokens kept of n: rounded (FastV's reference code), or truncated like int() (PyramidDrop's); the
    epsilon keeps 576 * 0.5 ** (1/3) ** 3 from truncating to 71."""
    k = int(n * fraction + 1e-9) if truncate else round(n * fraction)
    if k < 1:
        raise UserError(f"{flag} {fraction:g}: keeps {n} x {fraction:g} -> 0 of {n} image tokens; "
                        f"use at least {1 / n:.4g}")
    return k
