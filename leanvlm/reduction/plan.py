"""`leanvlm plan`: what a schedule does to a model, from its config alone (no weights loaded)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leanvlm.reduction.flops import prefill_flops
from leanvlm.reduction.schedule import Schedule


def vision_layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one ViT (CLIP) encoder layer over n tokens: 4 projections, attention, 2-matmul GELU MLP."""
    return 2.0 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


@dataclass
class Plan:
    text_tokens: int
    vision_tokens_per_layer: list[int]  # encoder layers that run (up to the feature layer)
    llm_tokens_per_layer: list[int]  # text + image tokens each decoder layer processes
    image_tokens_per_layer: list[int]
    vision_flops: float
    vision_flops_unreduced: float
    prefill_flops: float
    prefill_flops_unreduced: float
    kv_bytes: int  # the prompt's KV cache, all layers, one request
    kv_bytes_unreduced: int
    kv_dtype_bytes: int

    @property
    def vision_flops_ratio(self) -> float:
        return self.vision_flops / self.vision_flops_unreduced

    @property
    def prefill_flops_ratio(self) -> float:
        return self.prefill_flops / self.prefill_flops_unreduced

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_unreduced

    def to_dict(self) -> dict:
        return {**asdict(self), "vision_flops_ratio": self.vision_flops_ratio,
                "prefill_flops_ratio": self.prefill_flops_ratio, "kv_ratio": self.kv_ratio}


def make_plan(config, schedule: Schedule, text_tokens: int = 64, kv_dtype_bytes: int = 4) -> Plan:
    """Token counts, FLOPs and KV bytes of `schedule` on a LLaVA `config` for a prompt of `text_tokens`."""
    from leanvlm.models.llava_config import vision_layers_used

    v, t = config.vision_config, config.text_config
    n_vit = (v.image_size // v.patch_size) ** 2  # patches; CLS is added below
    merges = {s.layer: s.num_keep for s in schedule.vision_stages if s.kind == "vit_merge"}
    vision_tokens, n = [], n_vit
    for layer in range(vision_layers_used(config)):
        vision_tokens.append(n + 1)
        n = merges.get(layer, n)  # a merge inside layer i shrinks its MLP and every later layer (counted whole)
    vision = sum(vision_layer_flops(x, v.hidden_size, v.intermediate_size) for x in vision_tokens)
    vision_full = vision_layer_flops(n_vit + 1, v.hidden_size, v.intermediate_size) * len(vision_tokens)
    image = schedule.image_tokens_per_layer()
    kv_ratio = t.num_key_value_heads / t.num_attention_heads
    n_full = schedule.num_image_tokens  # every patch token reaches the unreduced LLM
    dims = (t.hidden_size, t.intermediate_size, kv_ratio)
    prefill = prefill_flops(schedule, text_tokens, *dims)
    prefill_full = prefill_flops(Schedule(schedule.num_layers, n_full), text_tokens, *dims)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    per_entry = 2 * t.num_key_value_heads * head_dim * kv_dtype_bytes
    return Plan(text_tokens, vision_tokens, [text_tokens + n for n in image], image, vision, vision_full, prefill,
                prefill_full, per_entry * sum(text_tokens + n for n in image),
                per_entry * (text_tokens + n_full) * len(image), kv_dtype_bytes)


def adaptive_summary(config, schedule: Schedule, record: dict, text_tokens: int = 64) -> dict:
    """For a schedule with adaptive stages: per stage its cap, min and the mean count measured when its ATP
    modules were trained (their atp.json record), and the prefill FLOPs ratio at those means (the plan's other
    numbers are at the cap, the bound the engine is sized for)."""
    from dataclasses import replace

    from leanvlm.reduction.flops import prefill_flops_ratio

    measured = record.get("measured", {})
    means = measured.get("mean_kept_per_stage", [measured.get("mean_kept")])
    adaptive = [s for s in schedule.stages if s.adaptive]
    stages, fixed = [], []
    for s in schedule.stages:
        if not s.adaptive:
            fixed.append(s)
            continue
        j = adaptive.index(s)
        mean = means[j] if j < len(means) and means[j] is not None else None
        mean = None if mean is None else min(float(mean), s.num_keep)  # a lower cap than trained clamps the mean
        stages.append({"layer": s.layer, "cap": s.num_keep, "min": s.min_keep, "spatial": s.spatial,
                       "static": s.static, "measured_mean_kept": mean})
        fixed.append(replace(s, kind="llm", min_keep=0, spatial=0, static=False,
                             num_keep=max(1, round(mean)) if mean is not None else s.num_keep))
    t = config.text_config
    at_mean = prefill_flops_ratio(replace(schedule, stages=tuple(fixed)), text_tokens, t.hidden_size,
                                  t.intermediate_size, t.num_key_value_heads / t.num_attention_heads)
    return {"stages": stages, "prefill_flops_ratio_at_measured_mean": at_mean,
            "measured": {k: measured.get(k) for k in ("data", "n", "accuracy", "mean_kept", "per_type")},
            "target_keep": record.get("target_keep")}
