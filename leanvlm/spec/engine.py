"""The typed engine spec: a manifest parsed once into dataclasses that the Pipeline, its preprocessor, the KV
cache and every backend take. Built from a manifest (`EngineSpec.from_manifest`) or, without exporting, from
a model config and a schedule (`EngineSpec.build`), as the schedule search scores candidates in memory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from leanvlm.errors import EngineError
from leanvlm.reduction.schedule import Schedule
from leanvlm.spec import defaults
from leanvlm.spec.names import GRAPH_NAMES, graph_file
from leanvlm.spec.precision import PRECISIONS, Precision, get_precision


@dataclass(frozen=True)
class ModelDims:
    """Sizes and special tokens of the exported model."""

    image_token_id: int
    num_image_tokens: int  # image tokens in the LLM prompt, after vision-encoder stages
    num_patch_tokens: int  # image tokens out of the vision tower
    image_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_config(cls, config, schedule: Schedule) -> "ModelDims":
        from leanvlm.models.llava_config import head_dim, pad_token_id

        text = config.text_config
        eos = text.eos_token_id
        return cls(image_token_id=int(config.image_token_id), num_image_tokens=schedule.llm_image_tokens,
                   num_patch_tokens=schedule.num_image_tokens, image_size=config.vision_config.image_size,
                   num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
                   num_kv_heads=text.num_key_value_heads, head_dim=head_dim(text), hidden_size=text.hidden_size,
                   intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
                   eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                   pad_token_id=pad_token_id(config))

    def to_dict(self) -> dict:
        return {"image_token_id": self.image_token_id, "num_image_tokens": self.num_image_tokens,
                "num_patch_tokens": self.num_patch_tokens, "image_size": self.image_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
                "eos_token_id": list(self.eos_token_ids), "pad_token_id": self.pad_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDims":
        eos = d.get("eos_token_id")
        return cls(**{k: int(d[k]) for k in (
            "image_token_id", "num_image_tokens", "image_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "hidden_size", "intermediate_size", "vocab_size")},
            num_patch_tokens=int(d.get("num_patch_tokens", d["num_image_tokens"])),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            pad_token_id=d.get("pad_token_id"))


@dataclass(frozen=True)
class Limits:
    """Shapes the engine accepts: they size the runtime's checks and the KV cache capacity per group."""

    max_batch: int = defaults.MAX_BATCH
    max_prompt: int = 0  # tokens including image tokens; 0: image tokens + defaults.PROMPT_TEXT_TOKENS
    max_new_tokens: int = defaults.MAX_NEW_TOKENS

    def to_dict(self) -> dict:
        return {"max_batch": self.max_batch, "max_prompt": self.max_prompt, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class CacheGroupSpec:
    """Decoder layers sharing one KV length. Their prompt entries are the prompt length minus the image tokens
    dropped before the group; decode positions are the full-prompt numbering minus `decode_position_offset`."""

    index: int
    layers: range
    image_tokens: int
    capacity: int
    decode_position_offset: int = 0

    def to_dict(self, llm_image_tokens: int) -> dict:
        dropped = llm_image_tokens - self.image_tokens
        rule = f"prompt_length - {dropped}" if dropped else "prompt_length"
        return {"group": self.index, "layers": [self.layers.start, self.layers.stop],
                "image_tokens": self.image_tokens, "length_rule": f"{rule} (+1 per decoded token)",
                "capacity": self.capacity, "decode_position_offset": self.decode_position_offset}


@dataclass(frozen=True)
class EngineSpec:
    """Everything the runtime needs to know about an engine. `directory` is None for an in-memory spec."""

    model: ModelDims
    schedule: Schedule
    limits: Limits
    cache_groups: tuple[CacheGroupSpec, ...]
    precision: Precision = PRECISIONS[defaults.PRECISION]
    source: dict = field(default_factory=dict)  # model, path, config_sha256
    graphs: dict = field(default_factory=dict)  # graph -> {file, opset, inputs, outputs}
    artifacts: dict = field(default_factory=dict)  # backend -> what it loads
    directory: Path | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the manifest as read

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, config, schedule: Schedule, limits: Limits | None = None, precision: str = defaults.PRECISION,
              source: dict | None = None) -> "EngineSpec":
        """The spec of `schedule` on a LLaVA `config` (what export writes, or an in-memory Pipeline runs)."""
        limits = limits or Limits()
        model = ModelDims.from_config(config, schedule)
        if not limits.max_prompt:
            limits = replace(limits, max_prompt=model.num_image_tokens + defaults.PROMPT_TEXT_TOKENS)
        n = model.num_image_tokens
        offsets = schedule.decode_position_offsets()
        groups = tuple(CacheGroupSpec(g, range(a, b), k, limits.max_prompt - (n - k) + limits.max_new_tokens,
                                      offsets[g]) for g, (a, b, k) in enumerate(schedule.groups))
        return cls(model, schedule, limits, groups, get_precision(precision), dict(source or {}))

    def manifest_sections(self) -> dict:
        """The manifest fields this spec owns (export adds graphs, artifacts, checks and versions)."""
        return {"source": self.source, "model": self.model.to_dict(), "precision": self.precision.to_dict(),
                "limits": self.limits.to_dict(),
                "cache_groups": [g.to_dict(self.model.num_image_tokens) for g in self.cache_groups]}

    @classmethod
    def from_manifest(cls, data: dict, directory: Path | None = None) -> "EngineSpec":
        """Parse a validated manifest; a malformed section is an EngineError naming it."""
        section = "schedule"
        try:
            schedule = Schedule.from_dict(data["schedule"])
            section = "model"
            model = ModelDims.from_dict(data["model"])
            section = "limits"
            limits = Limits(**{k: int(data["limits"][k]) for k in ("max_batch", "max_prompt", "max_new_tokens")})
            section = "cache_groups"
            groups = tuple(CacheGroupSpec(int(g.get("group", i)), range(*g["layers"]), int(g["image_tokens"]),
                                          int(g["capacity"]), int(g.get("decode_position_offset", 0)))
                           for i, g in enumerate(data["cache_groups"]))
            section = "precision"
            precision = get_precision((data.get("precision") or {}).get("name", "fp32"), "manifest precision")
            section = "graphs"
            graphs = dict(data["graphs"])
            artifacts = data.get("artifacts") or {"onnxruntime": {"graphs": {g: graphs[g]["file"] for g in graphs}}}
        except EngineError:
            raise
        except Exception as e:  # a manifest from another tool or a hand edit: name the section
            raise EngineError(f"{directory or 'manifest'}: section {section!r} is malformed ({type(e).__name__}: "
                              f"{e})") from e
        if [g.image_tokens for g in groups] != [n for _, _, n in schedule.groups]:
            raise EngineError(f"{directory or 'manifest'}: cache_groups do not match the schedule's stages")
        return cls(model, schedule, limits, groups, precision, dict(data.get("source", {})), graphs, artifacts,
                   directory, data)

    # ---- views ---------------------------------------------------------------------------------
    def graph_path(self, graph: str, backend: str = "onnxruntime") -> Path:
        if self.directory is None:
            raise EngineError("this engine spec was built in memory and has no graph files")
        files = (self.artifacts.get(backend) or {}).get("graphs") or {}
        return self.directory / files.get(graph, graph_file(graph))

    def graph_files(self, backend: str = "onnxruntime") -> dict[str, Path]:
        return {g: self.graph_path(g, backend) for g in GRAPH_NAMES}

    def unreduced(self) -> "EngineSpec":
        """The same model with no reduction stage: every patch token reaches the LLM, one cache group."""
        extra = self.model.num_patch_tokens - self.model.num_image_tokens  # what vision stages removed
        schedule = Schedule(self.schedule.num_layers, self.schedule.num_image_tokens,
                            vision_layers=self.schedule.vision_layers)
        limits = replace(self.limits, max_prompt=self.limits.max_prompt + extra)
        model = replace(self.model, num_image_tokens=self.model.num_patch_tokens)
        group = CacheGroupSpec(0, range(0, self.model.num_layers), model.num_image_tokens,
                               self.cache_groups[0].capacity + extra)
        return replace(self, model=model, schedule=schedule, limits=limits, cache_groups=(group,), graphs={},
                       artifacts={}, directory=None)
