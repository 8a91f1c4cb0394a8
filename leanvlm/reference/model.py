"""ReducedLlava: LLaVA-1.5 split into the four phases the engine has (vision, embed, prefill, decode),
with the reduction schedule applied inside prefill.

It reuses the Hugging Face modules (weights, norms, MLPs, rotary tables) and re-implements only the
layer wiring, so KV per layer, the single-row scoring and the token gather are explicit. The export
wrappers trace exactly these methods: the reference and the graphs share one source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from leanvlm.errors import UserError
from leanvlm.models import layout
from leanvlm.reduction import select
from leanvlm.reduction.schedule import Schedule


class ReducedLlava(nn.Module):
    """A LlavaForConditionalGeneration run phase by phase under a `Schedule`."""

    def __init__(self, hf_model: nn.Module, schedule: Schedule):
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        self.hf = hf_model
        self.schedule = schedule
        text = cfg.text_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.image_token_id = int(cfg.image_token_id)
        if not isinstance(cfg.vision_feature_layer, int):
            raise UserError(f"vision_feature_layer {cfg.vision_feature_layer}: only a single feature layer is supported")
        if schedule.num_layers != self.num_layers or schedule.num_image_tokens != self.num_image_tokens:
            raise ValueError(f"schedule {schedule} does not match the model ({self.num_layers} layers, "
                             f"{self.num_image_tokens} image tokens)")

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        return self.hf.model.language_model

    @property
    def vision_model(self) -> nn.Module:
        tower = self.hf.model.vision_tower
        return getattr(tower, "vision_model", tower)  # transformers < 5 nests the modules one level down

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.config)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers that feed the selected feature layer; later ones are never run."""
        layer = self.config.vision_feature_layer
        total = self.config.vision_config.num_hidden_layers
        return total + 1 + layer if layer < 0 else layer

    # ---- phases ----------------------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> image_features [B, N, D_text] (tower, feature layer, projector)."""
        vm = self.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers[: self.vision_layers_used]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        if self.config.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return self.hf.model.multi_modal_projector(h)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features spliced in at the `<image>` positions, in order.

        image_features may hold zero tokens (decode steps): a zero row is prepended so the gather
        index is always valid.
        """
        emb = self.lm.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        # float32 CumSum: TensorRT's CumSum takes float inputs only; counts < 2^24 are exact.
        index = (torch.cumsum(is_image.to(torch.float32), dim=1) * is_image.to(torch.float32)).to(torch.int64)
        index = index.clamp(max=image_features.shape[1])
        feats = torch.cat([image_features.new_zeros(image_features.shape[0], 1, image_features.shape[2]), image_features], 1)
        spliced = select.gather_tokens(feats.to(emb.dtype), index)
        return torch.where(is_image[..., None], spliced, emb)

    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        image_start: torch.Tensor,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """Run all decoder layers over a left-padded prompt, applying the schedule.

        Returns last-token logits [B, V], per-layer (key, value) [B, kv_heads, L_g, d] whose length
        L_g depends on the layer's cache group, and per stage the kept image-token indices [B, k].
        """
        h = inputs_embeds
        seq_len = h.shape[1]
        n_image = self.schedule.num_image_tokens
        mask = self._prefill_mask(attention_mask, h.dtype)
        cos, sin = self.lm.rotary_emb(h, position_ids)
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []
        kept_all: list[torch.Tensor] = []
        original = None  # [B, n_image]: original image-token index of each current image token
        scores = None
        for i, layer in enumerate(self.lm.layers):
            stage = self.schedule.stage_at(i)
            if stage is not None:
                if stage.score_at == "current":  # PyramidDrop: this layer's own q (last token) and k
                    scores = self._last_token_scores(layer, h, cos, sin, mask)
                local = select.select_top(select.image_scores(scores, image_start, n_image), stage.num_keep)
                original = local if original is None else torch.gather(original, 1, local)
                index = select.keep_index(image_start, local, seq_len, n_image)
                h = select.gather_tokens(h, index)
                attention_mask = select.gather_tokens(attention_mask, index)
                if stage.positions == "renumber":
                    position_ids = select.renumber_positions(attention_mask)
                else:
                    position_ids = select.gather_tokens(position_ids, index)
                mask = self._prefill_mask(attention_mask, h.dtype)
                cos, sin = self.lm.rotary_emb(h, position_ids)
                seq_len, n_image = h.shape[1], stage.num_keep
                kept_all.append(original)
            want_score = self.schedule.scores_at(i) is not None
            h, k, v, scores = self._layer(layer, h, cos, sin, mask, None, None, want_score)
            presents.append((k, v))
        logits = self.hf.lm_head(self.lm.norm(h[:, -1]))
        return logits, presents, kept_all

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        group_masks: list[torch.Tensor],
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One step for one new token per request.

        group_masks[g] [B, P_g + 1] marks valid past entries of cache group g plus the new token (last
        column). Returns logits [B, V] and the new (key, value) [B, kv_heads, 1, d] of every layer.
        """
        h = inputs_embeds
        cos, sin = self.lm.rotary_emb(h, position_ids)
        masks = [self._decode_mask(m, h.dtype) for m in group_masks]
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.lm.layers):
            pk, pv = past[i]
            h, k, v, _ = self._layer(layer, h, cos, sin, masks[self.schedule.group_of(i)], pk, pv, False)
            new_kv.append((k, v))
        logits = self.hf.lm_head(self.lm.norm(h[:, -1]))
        return logits, new_kv

    # ---- internals -------------------------------------------------------------------------
    def _project(self, proj, x, cos, sin, heads):
        """x [B, T, D] -> [B, heads, T, d], rotated by RoPE when cos/sin are given."""
        b, t, _ = x.shape
        y = proj(x).view(b, t, heads, self.head_dim).transpose(1, 2)
        if cos is None:
            return y
        c, s = cos[:, None], sin[:, None]
        return y * c + rotate_half(y) * s

    def _last_token_scores(self, layer, h, cos, sin, mask):
        """Head-mean attention of the last token over all keys, from `layer`'s own projections of h."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = self._project(attn.q_proj, x[:, -1:], cos[:, -1:], sin[:, -1:], self.num_heads)
        k = repeat_kv(self._project(attn.k_proj, x, cos, sin, self.num_kv_heads), self.num_heads // self.num_kv_heads)
        return select.last_query_scores(q, k, mask[:, :, -1:], attn.scaling)

    def _layer(self, layer, h, cos, sin, mask, past_k, past_v, want_score):
        attn = layer.self_attn
        b, t, _ = h.shape
        x = layer.input_layernorm(h)
        q = self._project(attn.q_proj, x, cos, sin, self.num_heads)
        k = self._project(attn.k_proj, x, cos, sin, self.num_kv_heads)
        v = self._project(attn.v_proj, x, None, None, self.num_kv_heads)
        k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
        v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
        n_rep = self.num_heads // self.num_kv_heads
        kr, vr = repeat_kv(k_all, n_rep), repeat_kv(v_all, n_rep)
        o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=attn.scaling)
        scores = None
        if want_score:
            scores = select.last_query_scores(q[:, :, -1:], kr, mask[:, :, -1:], attn.scaling)
        o = attn.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        h = h + o
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v, scores

    @staticmethod
    def _prefill_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Causal (by sequence order) and key-padding mask, additive [B, 1, L, L]."""
        n = attention_mask.shape[1]
        pos = torch.arange(n, device=attention_mask.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & (attention_mask[:, None, :] > 0)
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

    @staticmethod
    def _decode_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Key-padding mask for one query, additive [B, 1, 1, S]."""
        return torch.where(mask[:, None, None, :] > 0, 0.0, torch.finfo(dtype).min).to(dtype)


def num_image_tokens(config) -> int:
    """Image tokens a LLaVA config feeds the LLM: patches, plus CLS unless the 'default' strategy drops it."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Torch form of `leanvlm.models.layout.prompt_positions`."""
    return torch.from_numpy(layout.prompt_positions(attention_mask.cpu().numpy())).to(attention_mask.device)


def image_starts(input_ids: torch.Tensor, image_token_id: int, num_image_tokens: int) -> torch.Tensor:
    """Torch form of `leanvlm.models.layout.image_starts`."""
    start = layout.image_starts(input_ids.cpu().numpy(), image_token_id, num_image_tokens)
    return torch.from_numpy(start).to(input_ids.device)
