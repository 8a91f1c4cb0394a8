"""Facts a LLaVA config implies (image-token count, encoder layers that run, head size), without torch."""

from __future__ import annotations


def vision_layers_used(config) -> int:
    """Encoder layers that feed the selected feature layer; later ones are never run."""
    layer = config.vision_feature_layer
    return config.vision_config.num_hidden_layers + 1 + layer if layer < 0 else layer


def num_image_tokens(config) -> int:
    """Image tokens a LLaVA config feeds the LLM: patches, plus CLS unless the 'default' strategy drops it."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def pad_token_id(config) -> int | None:
    return config.pad_token_id if config.pad_token_id is not None else config.text_config.pad_token_id
