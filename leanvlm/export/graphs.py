"""Traceable wrappers, one per exported graph, around the ReducedLlava phases, with the IO names of
shared/reference/deployment-conventions.md and their dynamic axes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanvlm.export.decode_graph import DecodeGraph
from leanvlm.reference.model import ReducedLlava
from leanvlm.spec import names


@dataclass
class GraphSpec:
    """What to export for one graph: module, example inputs, IO names and named dynamic axes."""

    name: str
    module: nn.Module
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


class VisionGraph(nn.Module):
    def __init__(self, ref: ReducedLlava):
        super().__init__()
        self.ref = ref

    def forward(self, pixel_values):
        feats, kept, targets = self.ref.vision(pixel_values)
        return (feats, *kept, *targets)


class EmbedGraph(nn.Module):
    def __init__(self, ref: ReducedLlava):
        super().__init__()
        self.ref = ref

    def forward(self, input_ids, image_features):
        return self.ref.embed(input_ids, image_features)


class PrefillGraph(nn.Module):
    def __init__(self, ref: ReducedLlava):
        super().__init__()
        self.ref = ref

    def forward(self, inputs_embeds, attention_mask, position_ids, image_start):
        logits, presents, kept, targets = self.ref.prefill(inputs_embeds, attention_mask, position_ids, image_start)
        return (logits, *[t for kv in presents for t in kv], *kept, *targets)


def stage_outputs(stages) -> list[str]:
    """Index output names of a run of stages (see spec.names.stage_output_names)."""
    return names.stage_output_names([st.merges for st in stages])


def build_specs(ref: ReducedLlava, batch: int = 2, text_len: int = 9, past_extra: int = 3) -> list[GraphSpec]:
    """Export specs with example inputs whose dynamic dims are all >= 2 (a dim of 1 gets specialised)."""
    cfg = ref.config
    v = cfg.vision_config
    n_img = ref.num_image_tokens
    d = cfg.text_config.hidden_size
    dtype = next(ref.parameters()).dtype
    n_layers = ref.num_layers
    groups = ref.schedule.groups
    seq = text_len + n_img
    g = torch.Generator().manual_seed(0)

    pixel_values = torch.randn(batch, 3, v.image_size, v.image_size, generator=g, dtype=dtype)
    ids = torch.randint(0, min(cfg.text_config.vocab_size, 100), (batch, seq), generator=g)
    ids[:, 3 : 3 + n_img] = ref.image_token_id
    image_features = torch.randn(batch, n_img, d, generator=g, dtype=dtype)
    embeds = torch.randn(batch, seq, d, generator=g, dtype=dtype)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    start = torch.full((batch,), 3, dtype=torch.int64)

    vision_out = [names.IMAGE_FEATURES, *stage_outputs(ref.schedule.vision_stages)]
    specs = [
        GraphSpec("vision", VisionGraph(ref), (pixel_values,), [names.PIXEL_VALUES], vision_out,
                  {name: {0: "batch_size"} for name in [names.PIXEL_VALUES, *vision_out]}),
        GraphSpec("embed", EmbedGraph(ref), (ids, image_features), [names.INPUT_IDS, names.IMAGE_FEATURES],
                  [names.INPUTS_EMBEDS],
                  {names.INPUT_IDS: {0: "batch_size", 1: "sequence_length"},
                   names.IMAGE_FEATURES: {0: "batch_size", 1: "num_image_tokens"},
                   names.INPUTS_EMBEDS: {0: "batch_size", 1: "sequence_length"}}),
    ]

    present = names.present_names(n_layers)
    kept = stage_outputs(ref.schedule.stages)
    pre_axes = {names.INPUTS_EMBEDS: {0: "batch_size", 1: "sequence_length"},
                names.ATTENTION_MASK: {0: "batch_size", 1: "sequence_length"},
                names.POSITION_IDS: {0: "batch_size", 1: "sequence_length"},
                names.IMAGE_START: {0: "batch_size"}, names.LOGITS: {0: "batch_size"}}
    for i in range(n_layers):
        gi = ref.schedule.group_of(i)
        for kind in ("key", "value"):
            pre_axes[names.kv_name("present", i, kind)] = {0: "batch_size",
                                                           2: names.group_axis(gi, "present_sequence_length")}
    for name in kept:  # kept_indices.* and merge_targets.*
        pre_axes[name] = {0: "batch_size"}
    for j, st in enumerate(ref.schedule.stages):  # adaptive: K is the batch's largest count, known at run time
        if st.adaptive and not st.static:
            pre_axes[kept[j]] = {0: "batch_size", 1: f"adaptive_tokens_{j}"}
    specs.append(GraphSpec("prefill", PrefillGraph(ref), (embeds, mask, pos, start),
                           [names.INPUTS_EMBEDS, names.ATTENTION_MASK, names.POSITION_IDS, names.IMAGE_START],
                           [names.LOGITS, *present, *kept], pre_axes))

    kvh, hd = ref.num_kv_heads, ref.head_dim
    past_lens = [seq - n_img + n + past_extra + gi for gi, (_, _, n) in enumerate(groups)]
    masks = [torch.ones(batch, p + 1, dtype=torch.int64) for p in past_lens]
    past = []
    for i in range(n_layers):
        p = past_lens[ref.schedule.group_of(i)]
        past += [torch.randn(batch, kvh, p, hd, generator=g, dtype=dtype) for _ in range(2)]
    step = torch.randn(batch, 1, d, generator=g, dtype=dtype)
    step_pos = torch.full((batch, 1), seq + past_extra, dtype=torch.int64)
    mask_names = [names.decode_mask_name(gi) for gi in range(len(groups))]
    past_names = names.past_names(n_layers)
    dec_axes = {names.INPUTS_EMBEDS: {0: "batch_size"}, names.POSITION_IDS: {0: "batch_size"},
                names.LOGITS: {0: "batch_size"}}
    for gi, name in enumerate(mask_names):
        dec_axes[name] = {0: "batch_size", 1: names.group_axis(gi, "total_sequence_length")}
    for i in range(n_layers):
        gi = ref.schedule.group_of(i)
        for kind in ("key", "value"):
            dec_axes[names.kv_name("past_key_values", i, kind)] = {
                0: "batch_size", 2: names.group_axis(gi, "past_sequence_length")}
            dec_axes[names.kv_name("present", i, kind)] = {0: "batch_size"}
    specs.append(GraphSpec("decode", DecodeGraph(ref), (step, step_pos, *masks, *past),
                           [names.INPUTS_EMBEDS, names.POSITION_IDS, *mask_names, *past_names],
                           [names.LOGITS, *present], dec_axes))
    return specs
