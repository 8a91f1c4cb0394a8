"""Graph, input/output and node names of an engine: one place for export, verification, backends, parity and
the manifest.

IO names follow Optimum / ONNX Runtime GenAI (`past_key_values.{i}.key`, `present.{i}.value`, `logits`).
Node names of the reduction path follow ONNX Runtime GenAI's `/model/layers.{i}/...` convention: every node a
stage adds (its score, TopK, Gather and merge arithmetic) is named `/model/layers.{L}/reduce/{Op}` for the LLM
stage acting at decoder layer L, `/vision/layers.{i}/reduce/{Op}` for a ViT merge in encoder layer i and
`/vision/visionzip/reduce/{Op}` for VisionZip, so a quantiser can exclude them and TensorRT can pin them to
fp32 by prefix.
"""

from __future__ import annotations

import re

GRAPH_NAMES = ("vision", "embed", "prefill", "decode")

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
IMAGE_START = "image_start"
LOGITS = "logits"
KEPT_INDICES = "kept_indices"
MERGE_TARGETS = "merge_targets"
INDEX_PREFIXES = (KEPT_INDICES + ".", MERGE_TARGETS + ".")

REDUCE_SCOPE = "reduce"  # the path component every reduction node carries


def graph_file(graph: str) -> str:
    return f"{graph}.onnx"


def kv_name(prefix: str, layer: int, kind: str) -> str:
    """`past_key_values.{i}.key` style name; prefix is `past_key_values` or `present`."""
    return f"{prefix}.{layer}.{kind}"


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """`{prefix}.{i}.key`, `{prefix}.{i}.value` for every layer, in that order."""
    return [kv_name(prefix, i, kind) for i in range(num_layers) for kind in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return kv_names("past_key_values", num_layers)


def present_names(num_layers: int) -> list[str]:
    return kv_names("present", num_layers)


def decode_mask_name(group: int) -> str:
    """The decode attention mask of cache group g: `[B, P_g + 1]`."""
    return f"{ATTENTION_MASK}.{group}"


def group_axis(group: int, prefix: str) -> str:
    """Name of the dynamic length axis of cache group g (layers sharing one KV length)."""
    return f"{prefix}_{group}"


def stage_output_names(merges: list[bool]) -> list[str]:
    """Index outputs of a run of stages: `kept_indices.{j}` for each, then `merge_targets.{j}` for each
    stage that merges (`merges[j]`)."""
    return [*[f"{KEPT_INDICES}.{j}" for j in range(len(merges))],
            *[f"{MERGE_TARGETS}.{j}" for j, m in enumerate(merges) if m]]


def is_index_output(name: str) -> bool:
    return name.startswith(INDEX_PREFIXES)


def indexed_outputs(out: dict, prefix: str) -> list:
    """Values of `{prefix}.{j}` outputs in stage order j."""
    keys = [k for k in out if k.startswith(prefix + ".")]
    return [out[k] for k in sorted(keys, key=lambda k: int(k.split(".")[1]))]


# ---- node names of the reduction path --------------------------------------------------------------
def llm_stage_scope(layer: int) -> str:
    return f"/model/layers.{layer}/{REDUCE_SCOPE}"


def vit_stage_scope(layer: int) -> str:
    return f"/vision/layers.{layer}/{REDUCE_SCOPE}"


VISIONZIP_SCOPE = f"/vision/visionzip/{REDUCE_SCOPE}"

# Keys of the scope modules the reference model calls each stage's ops through; the exporters record them
# in node names (TorchScript: `/llm-2/TopK`, `/llm-2_1/TopK` for the second call) or node metadata (dynamo:
# `pkg.torch.onnx.name_scopes`), and `stable_scope` maps them to the names above.
_SCOPE_KEY = re.compile(r"(?:^|[/.])(llm|vit)-(\d+)(?:_\d+)?(?=/|$|')|(?:^|[/.])(visionzip)(?:_\d+)?(?=/|$|')")


def scope_key(kind: str, layer: int | None = None) -> str:
    """Module key of a stage's scope: `llm-2`, `vit-4`, `visionzip`."""
    return "visionzip" if kind == "visionzip" else f"{kind}-{layer}"


def stable_scope(recorded: str) -> str | None:
    """The stable prefix for a node whose exporter-recorded scope text holds a stage's scope key, else None."""
    m = _SCOPE_KEY.search(recorded)
    if m is None:
        return None
    if m.group(3):
        return VISIONZIP_SCOPE
    return llm_stage_scope(int(m.group(2))) if m.group(1) == "llm" else vit_stage_scope(int(m.group(2)))


def is_reduction_node(name: str) -> bool:
    """Whether a node name (after export) belongs to the reduction path."""
    return f"/{REDUCE_SCOPE}/" in name
