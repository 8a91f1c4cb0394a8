"""ReducedLlava: LLaVA-1.5 split into the four phases the engine has (vision, embed, prefill, decode),
with the reduction schedule applied inside prefill.

It reuses the Hugging Face modules (weights, norms, MLPs, rotary tables) and re-implements only the
layer wiring, so KV per layer, the single-row scoring and the token gather are explicit. The export
wrappers trace exactly these methods (the reference and the graphs share one source), except decode: its
graph computes the same step in a form that never copies the cache (export.decode_graph), and export checks
it against `decode` here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from leanvlm.errors import UserError
from leanvlm.models import layout
from leanvlm.models.llava_config import head_dim, num_image_tokens, vision_layers_used
from leanvlm.reduction import atp, merge, select
from leanvlm.reduction.schedule import Schedule
from leanvlm.spec.names import scope_key


class _Scope(nn.Module):
    """Calls a function under this module's name. The exporters record that name on every node the function
    adds (TorchScript in the node name, dynamo in its name-scope metadata), which is how the reduction path
    gets its stable node names (leanvlm.spec.names)."""

    def forward(self, fn, *args):
        return fn(*args)


class ReducedLlava(nn.Module):
    """A LlavaForConditionalGeneration run phase by phase under a `Schedule`."""

    def __init__(self, hf_model: nn.Module, schedule: Schedule, atp_modules: dict | None = None):
        """atp_modules: the ATP module of each adaptive stage by layer; None loads them from the directory the
        model was loaded from (reduction.atp.load_atp) when the schedule has adaptive stages."""
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        self.hf = hf_model
        self.schedule = schedule
        text = cfg.text_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = head_dim(text)
        self.image_token_id = int(cfg.image_token_id)
        if not isinstance(cfg.vision_feature_layer, int):
            raise UserError(f"vision_feature_layer {cfg.vision_feature_layer}: only a single feature layer is supported")
        if schedule.num_layers != self.num_layers or schedule.num_image_tokens != num_image_tokens(cfg):
            raise ValueError(f"schedule {schedule} does not match the model ({self.num_layers} layers, "
                             f"{num_image_tokens(cfg)} image tokens)")
        if schedule.vision_stages and cfg.vision_feature_select_strategy != "default":
            raise UserError("vision-encoder stages need vision_feature_select_strategy 'default' (CLS dropped)")
        keys = [scope_key("llm", s.layer) for s in schedule.stages]
        keys += [scope_key(v.kind if v.kind == "visionzip" else "vit", v.layer) for v in schedule.vision_stages]
        self.reduce = nn.ModuleDict({k: _Scope() for k in keys})
        self.decode_offsets = schedule.decode_position_offsets()
        adaptive = [st for st in schedule.stages if st.adaptive]
        if adaptive and atp_modules is None:
            directory = atp.model_directory(hf_model)
            if directory is None:
                raise UserError("the schedule has adaptive stages but the model was not loaded from a directory "
                                "holding its ATP modules; pass atp_modules=")
            atp_modules = atp.load_atp(directory, cfg, schedule)
        missing = [st.layer for st in adaptive if st.layer not in (atp_modules or {})]
        if missing:
            raise UserError(f"adaptive stage(s) at layer(s) {missing} have no ATP module")
        self.atp = nn.ModuleDict({str(st.layer): atp_modules[st.layer] for st in adaptive})
        # SAP's always-kept tokens, as flags over the LLM's image tokens (a graph constant)
        self._spatial = {st.layer: atp.spatial_flags(schedule.llm_image_tokens, st.spatial).tolist() for st in adaptive}

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
        """Image tokens in the LLM prompt (after any vision-encoder stage)."""
        return self.schedule.llm_image_tokens

    @property
    def vision_layers_used(self) -> int:
        return vision_layers_used(self.config)

    # ---- phases ----------------------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor):
        """pixel_values [B, 3, H, W] -> (image_features [B, N', D_text], kept, merge_targets).

        Runs the tower up to the feature layer with the schedule's vision stages, then the projector.
        kept[j] [B, n_j]: original patch index of each token after vision stage j (for VisionZip: dominant,
        then contextual tokens, in image-token order; -1 for the CLS token when it is kept); merge_targets[j]:
        the tokens that absorbed others.
        """
        vm = self.vision_model
        h = _layer_norm(vm.pre_layrnorm, vm.embeddings(pixel_values))
        stages = {v.layer: v for v in self.schedule.vision_stages if v.kind == "vit_merge"}
        zipper = next((v for v in self.schedule.vision_stages if v.kind == "visionzip"), None)
        last = self.vision_layers_used - 1
        origin = torch.arange(h.shape[1] - 1, device=h.device)[None].expand(h.shape[0], -1)
        kept, targets, zip_inputs = [], [], None
        for i, layer in enumerate(vm.encoder.layers[: last + 1]):
            stage = stages.get(i)
            if stage is None and not (zipper is not None and i == last) and h.dtype == torch.float32:
                h = layer(h, None)  # Hugging Face's own layer: fused attention
                h = h[0] if isinstance(h, tuple) else h
                continue
            h, probs, q, keys = self._vit_attention(layer, h, need_probs=stage is not None)
            if zipper is not None and i == last:
                zip_inputs = self.reduce["visionzip"](self._visionzip_inputs, layer, q, keys)
            if stage is not None:
                h, origin, zip_inputs, target = self.reduce[scope_key("vit", i)](
                    self._vit_merge, h, probs, origin, stage.num_keep, zip_inputs)
                targets.append(target)
                kept.append(origin)
            h = h + layer.mlp(_layer_norm(layer.layer_norm2, h))
        feats = h[:, 1:] if self.config.vision_feature_select_strategy == "default" else h
        if zipper is not None:
            feats, zip_kept, zip_target = self.reduce["visionzip"](self._visionzip, zipper, h, feats, origin,
                                                                   zip_inputs)
            kept.append(zip_kept)
            if zipper.merges:
                targets.append(zip_target)
        return self.hf.model.multi_modal_projector(feats), kept, targets

    @staticmethod
    def _visionzip_inputs(layer, q, keys):
        """VisionZip's scores: the CLS query row of the feature layer's attention (head-summed, as VisionZip
        ranks) over the patches, and the head-mean keys of the patches."""
        q, keys = q.float(), keys.float()  # scores feeding TopK: fp32 at every precision
        cls_row = torch.softmax(torch.matmul(q[:, :, :1], keys.transpose(-1, -2)) * layer.self_attn.scale, -1)
        return cls_row.sum(1)[:, 0, 1:], keys.mean(1)[:, 1:]

    @staticmethod
    def _vit_merge(h, probs, origin, num_keep: int, zip_inputs):
        """iLLaVA's ViT merge of the patch tokens down to num_keep; CLS stays first."""
        received = probs.mean(1).mean(1)[:, 1:]  # attention each patch receives: mean over heads, queries
        patches, keep, target = merge.rank_weighted_merge(h[:, 1:], received, int(origin.shape[1]) - num_keep)
        h = torch.cat([h[:, :1], select.gather_tokens(patches, keep)], 1)
        if zip_inputs is not None:  # merged in the feature layer too: survivors keep their own score, key
            zip_inputs = (torch.gather(zip_inputs[0], 1, keep), select.gather_tokens(zip_inputs[1], keep))
        return h, torch.gather(origin, 1, keep), zip_inputs, torch.gather(origin, 1, target[:, None])

    @staticmethod
    def _visionzip(zipper, h, feats, origin, zip_inputs):
        """VisionZip on the feature layer's patch tokens; with keep_cls the CLS token leads the dominant ones."""
        cls_attention, keys = zip_inputs
        out, dom, tgt = merge.visionzip(feats, cls_attention, keys, zipper.dominant_patches, zipper.contextual)
        kept = torch.cat([torch.gather(origin, 1, dom), torch.gather(origin, 1, tgt)], 1)
        if zipper.keep_cls:
            out = torch.cat([h[:, :1], out], 1)
            kept = torch.cat([torch.full_like(kept[:, :1], -1), kept], 1)  # CLS has no patch index
        return out, kept, torch.gather(origin, 1, tgt)

    def _vit_attention(self, layer, h, need_probs: bool):
        """CLIP self-attention with its residual; also head-wise probabilities (when asked), queries and keys."""
        attn = layer.self_attn
        b, t, _ = h.shape
        x = _layer_norm(layer.layer_norm1, h)
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(b, t, heads, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, heads, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, heads, hd).transpose(1, 2)
        o, probs = _attend(q, k, v, attn.scale, None, need_probs)  # merge scores need every row
        h = h + attn.out_proj(o.transpose(1, 2).reshape(b, t, heads * hd))
        return h, probs, q, k

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
        L_g depends on the layer's cache group, per stage the kept image-token indices [B, k] (into the
        LLM's image tokens), and per merge stage the token that absorbed the others [B, 1].
        """
        state = self.prefill_start(inputs_embeds, attention_mask, position_ids, image_start)
        self.prefill_layers(state, 0, self.num_layers)
        return self.prefill_finish(state)

    def prefill_start(self, inputs_embeds, attention_mask, position_ids, image_start) -> "PrefillState":
        """The state at the input of decoder layer 0 (see `prefill_layers`)."""
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)
        return PrefillState(inputs_embeds, attention_mask, position_ids, image_start, self._prefill_mask(attention_mask),
                            cos, sin, self.schedule.llm_image_tokens)

    def prefill_layers(self, state: "PrefillState", start: int, stop: int, score_every_layer: bool = False) -> None:
        """Advance `state` (at the input of layer `start`, before that layer's stage) through layers
        start..stop-1, applying their stages. The state at a layer's input depends only on the stages of earlier
        layers, so a schedule search resumes candidates that share those from one saved state (`state.copy()`).
        score_every_layer: keep every layer's last-token scores in the state, so a candidate may put a
        score_at "previous", last_token stage at any layer it resumes at."""
        for i in range(start, stop):
            layer = self.lm.layers[i]
            stage = self.schedule.stage_at(i)
            if stage is not None and stage.adaptive:
                h, mask_2d, pos, local, state.valid = self.reduce[scope_key("llm", stage.layer)](
                    self._apply_adaptive, stage, state.h, state.scores, state.attention_mask, state.position_ids,
                    state.image_start, state.n_image, state.original, state.valid)
                state.h, state.attention_mask, state.position_ids = h, mask_2d, pos
                state.original = local if state.original is None else torch.gather(state.original, 1, local)
                state.mask = self._prefill_mask(mask_2d)
                state.cos, state.sin = self.lm.rotary_emb(h, pos)
                state.n_image = local.shape[1]  # data-dependent: the batch's largest count (or the cap when static)
                state.kept.append(torch.where(state.valid, state.original, torch.full_like(state.original, -1)))
            elif stage is not None:
                h, mask_2d, pos, local, target = self.reduce[scope_key("llm", stage.layer)](
                    self._apply_stage, stage, layer, state.h, state.scores, state.attention_mask, state.position_ids,
                    state.image_start, state.cos, state.sin, state.mask, state.n_image)
                state.h, state.attention_mask, state.position_ids = h, mask_2d, pos
                if target is not None:
                    state.targets.append(target if state.original is None else torch.gather(state.original, 1, target))
                state.original = local if state.original is None else torch.gather(state.original, 1, local)
                state.mask = self._prefill_mask(mask_2d)
                state.cos, state.sin = self.lm.rotary_emb(h, pos)
                state.n_image = stage.num_keep
                state.kept.append(state.original)
            scorer = self.schedule.scores_at(i)
            state.h, k, v, state.scores = self._layer(layer, state.h, state.cos, state.sin, state.mask, None, None,
                                                      scorer, state.attention_mask, score_every_layer)
            state.presents.append((k, v))

    def prefill_finish(self, state: "PrefillState"):
        """(logits, presents, kept, targets) of a state that has run every layer (see `prefill`)."""
        logits = self.hf.lm_head(self.lm.norm(state.h[:, -1])).float()
        return logits, state.presents, state.kept, state.targets

    def _apply_stage(self, stage, layer, h, scores, attention_mask, position_ids, image_start, cos, sin, mask,
                     n_image: int):
        """One LLM stage at the input of `layer`: score (or take the previous layer's scores), select or merge,
        and gather the surviving tokens with their mask and positions. Returns (h, attention_mask,
        position_ids, kept [B, k] and merge target [B, 1] or None, both local to the current image tokens)."""
        if stage.score_at == "current":  # PyramidDrop: this layer's own q (last token) and k
            scores = self._last_token_scores(layer, h, cos, sin, mask)
        image_scores = select.image_scores(scores, image_start, n_image)
        target = None
        if stage.action == "merge":  # iLLaVA: the removed tokens are averaged into one kept token
            h, local, target = self._merge_image_tokens(h, image_scores, image_start, n_image, stage.num_keep)
        else:
            local = select.select_top(image_scores, stage.num_keep)
        index = select.keep_index(image_start, local, h.shape[1], n_image)
        h = select.gather_tokens(h, index)
        attention_mask = select.gather_tokens(attention_mask, index)
        if stage.positions == "renumber":
            position_ids = select.renumber_positions(attention_mask)
        else:
            position_ids = select.gather_tokens(position_ids, index)
        return h, attention_mask, position_ids, local, target

    def _apply_adaptive(self, stage, h, scores, attention_mask, position_ids, image_start, n_image, original,
                        valid):
        """An adaptive stage (reduction.atp) at the input of its layer: per-sample counts from the ATP module's
        scores and threshold, TopK with K = the batch's largest count (or the cap), the slots beyond each
        sample's own count masked in the attention mask. Returns (h, attention_mask, position_ids, kept [B, K]
        local to the current image tokens, slot validity [B, K])."""
        b = h.shape[0]
        span = image_start[:, None] + torch.arange(n_image, device=h.device)[None]
        image_h = select.gather_tokens(h, span)
        if valid is None:
            valid = torch.ones(span.shape, dtype=torch.bool, device=h.device)
        flags = torch.tensor(self._spatial[stage.layer], dtype=torch.bool, device=h.device)[None].expand(b, -1)
        spatial = flags if original is None else torch.gather(flags, 1, original)
        module = self.atp[str(stage.layer)]
        token_scores = module.token_scores(select.image_scores(scores, image_start, n_image), image_h, valid)
        theta = module.threshold(h[:, -1], image_h, valid)
        count = atp.counts(token_scores, theta, valid, spatial, stage.min_keep, stage.num_keep)
        local, slot_valid = atp.select(token_scores, count, valid, spatial, stage.num_keep, stage.static)
        index = select.keep_index(image_start, local, h.shape[1], n_image)
        h = select.gather_tokens(h, index)
        attention_mask = select.gather_tokens(attention_mask, index)
        position_ids = select.gather_tokens(position_ids, index)
        attention_mask = select.mask_slots(attention_mask, image_start, slot_valid)
        return h, attention_mask, position_ids, local, slot_valid

    @staticmethod
    def _merge_image_tokens(h, image_scores, image_start, n_image: int, num_keep: int):
        """Rank-weighted merge within the image span; returns h with the merged token written back, the kept
        image-token indices [B, num_keep] (ascending) and the merge target [B, 1], both local to the span."""
        span = image_start[:, None] + torch.arange(n_image, device=h.device)[None]
        image, keep, target = merge.rank_weighted_merge(select.gather_tokens(h, span), image_scores,
                                                        n_image - num_keep)
        merged = torch.gather(image, 1, target[:, None, None].expand(-1, 1, image.shape[2]))
        j = torch.arange(h.shape[1], device=h.device)[None]
        h = torch.where((j == (image_start + target)[:, None])[..., None], merged, h)
        return h, keep, target[:, None]

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        group_masks: list[torch.Tensor],
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One step for one new token per request.

        group_masks[g] [B, P_g + 1] marks valid past entries of cache group g plus the new token (last
        column). position_ids [B, 1] number the token after the full prompt; groups after a renumbering stage
        subtract their decode position offset (Schedule.decode_position_offsets). Returns logits [B, V] and the
        new (key, value) [B, kv_heads, 1, d] of every layer.
        """
        h = inputs_embeds
        rotary = {off: self.lm.rotary_emb(h, position_ids - off if off else position_ids)
                  for off in sorted(set(self.decode_offsets))}
        masks = [self._decode_mask(m) for m in group_masks]
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.lm.layers):
            pk, pv = past[i]
            g = self.schedule.group_of(i)
            cos, sin = rotary[self.decode_offsets[g]]
            h, k, v, _ = self._layer(layer, h, cos, sin, masks[g], pk, pv, None)
            new_kv.append((k, v))
        logits = self.hf.lm_head(self.lm.norm(h[:, -1])).float()
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

    def _layer(self, layer, h, cos, sin, mask, past_k, past_v, scorer=None, query_mask=None, score_last=False):
        """One decoder layer. With `scorer` (the stage scored by this layer) also returns head-mean attention
        scores over the keys [B, S] by the stage's score: from the last query row only ("last_token"), or
        averaged over every non-pad query row ("mean_received": this layer's full attention matrix is then
        computed explicitly). score_last: last-token scores even without a stage (schedule search)."""
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
        scores = None
        mean_received = scorer is not None and scorer.score == "mean_received"
        o, probs = _attend(q, kr, vr, attn.scaling, mask, mean_received)
        if mean_received:
            scores = self.reduce[scope_key("llm", scorer.layer)](_mean_received, probs, query_mask)
        if scorer is not None and scorer.score == "last_token":
            scores = self.reduce[scope_key("llm", scorer.layer)](select.last_query_scores, q[:, :, -1:], kr,
                                                                 mask[:, :, -1:], attn.scaling)
        elif score_last and scorer is None:
            scores = select.last_query_scores(q[:, :, -1:], kr, mask[:, :, -1:], attn.scaling)
        o = attn.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        h = h + o
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v, scores

    @staticmethod
    def _prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Causal (by sequence order) and key-padding mask, additive [B, 1, L, L], float32 (the softmax is)."""
        n = attention_mask.shape[1]
        pos = torch.arange(n, device=attention_mask.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & (attention_mask[:, None, :] > 0)
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]

    @staticmethod
    def _decode_mask(mask: torch.Tensor) -> torch.Tensor:
        """Key-padding mask for one query, additive [B, 1, 1, S], float32."""
        return torch.where(mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)


@dataclass
class PrefillState:
    """Everything prefill carries from one decoder layer to the next: hidden states, the (reduced) mask and
    positions, the last scores, and what earlier layers produced (KV, kept indices, merge targets)."""

    h: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_start: torch.Tensor
    mask: torch.Tensor  # additive [B, 1, L, L]
    cos: torch.Tensor
    sin: torch.Tensor
    n_image: int
    scores: torch.Tensor | None = None  # the previous layer's scores over the sequence, if it computed any
    original: torch.Tensor | None = None  # [B, n_image]: original image-token index of each current image token
    valid: torch.Tensor | None = None  # after an adaptive stage: [B, n_image] bool, False beyond a sample's count
    presents: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    targets: list = field(default_factory=list)  # merge stages only, in stage order

    def copy(self) -> "PrefillState":
        """A copy that can advance on its own (tensors are shared: layers replace them, never write into them)."""
        return replace(self, presents=list(self.presents), kept=list(self.kept), targets=list(self.targets))


@contextlib.contextmanager
def float32_compute(model: nn.Module):
    """Run a float16/bfloat16 model in float32 without a float32 copy of it: the parameters of a module and
    its children are upcast when it is called and restored when it returns, so about one layer's weights
    are copied at a time. Inputs must be float32. This is how export computes the fp32 reference of a
    half-precision checkpoint."""
    if all(not p.is_floating_point() or p.dtype == torch.float32 for p in model.parameters()):
        yield
        return
    saved: list[list] = []

    def upcast(module, _args):
        entries = []
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                    entries.append((sub, name, p))
                    sub._parameters[name] = p.float()  # a tensor, not a Parameter: bypasses __setattr__
        saved.append(entries)

    def restore(_module, _args, _out):
        for sub, name, p in saved.pop():
            sub._parameters[name] = p

    handles = []
    for m in model.modules():
        if next(m.parameters(), None) is not None:
            handles += [m.register_forward_pre_hook(upcast), m.register_forward_hook(restore)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _attend(q, k, v, scale: float, mask, want_probs: bool):
    """Attention over [B, H, T, d] heads -> (output, probabilities or None). float32 without probabilities
    uses the fused kernel; otherwise the logits, mask and softmax are computed explicitly in float32 (at half
    precision this is the fp32 island every engine keeps) and the probabilities are cast back for the value
    product."""
    if not want_probs and q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm computed in float32 whatever the precision (its reductions are the fragile part)."""
    if x.dtype == torch.float32:
        return norm(x)
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


def _mean_received(probs: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Attention each key receives, head-mean, averaged over the non-pad query rows: [B, H, L, S] -> [B, S]."""
    rows = query_mask.to(probs.dtype)[:, :, None]  # pad queries do not vote
    return (probs.mean(1) * rows).sum(1) / rows.sum(1)


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Torch form of `leanvlm.models.layout.prompt_positions`."""
    return torch.from_numpy(layout.prompt_positions(attention_mask.cpu().numpy())).to(attention_mask.device)


def image_starts(input_ids: torch.Tensor, image_token_id: int, num_image_tokens: int) -> torch.Tensor:
    """Torch form of `leanvlm.models.layout.image_starts`."""
    start = layout.image_starts(input_ids.cpu().numpy(), image_token_id, num_image_tokens)
    return torch.from_numpy(start).to(input_ids.device)
