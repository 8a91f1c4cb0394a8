"""The decode graph: one step for one new token per request, written for the exported graph's speed.

`ReducedLlava.decode` is the reference of a decode step (Hugging Face's formulation: rotary embedding from
the position, the new entry concatenated to the past, attention over the result). Traced as is, that makes
a graph that copies every layer's whole cache buffer each step (Concat of past and new entry) and carries
hundreds of shape-bookkeeping nodes. This module computes the same step differently and the export check
compares it with the reference (export.verify):

- attention over the past and over the new entry separately: scores against the past buffer and against the
  new key, one softmax over the two joined (a Concat of score rows, [B, H, 1, P+1], not of the cache), then
  weights @ V_past + w_new * v_new. The cache buffer is only read; the runtime writes the new entry in place.
  Grouped-query attention groups the query heads by KV head instead of repeating the cache.
- rotary embedding as one small MatMul per query and key: a [d, d] rotation matrix per request built once per
  step from cos/sin tables gathered by position (tables precomputed at export for static RoPE types); the
  softmax scale is folded into the query's matrix.
- shapes from constants: with one token per request every reshape is a view with a constant shape (batch
  as -1), so no Shape/Gather/Concat chains and no transposes around attention.

Standard ONNX ops only (MatMul, Gather, Concat, Softmax, Slice, Reshape...): TensorRT 10.3 parses it.
"""

from __future__ import annotations

import torch
from torch import nn

from leanvlm.reference.model import ReducedLlava

# RoPE types whose cos/sin depend only on the position (transformers' ROPE_INIT_FUNCTIONS): tabulated at export.
# Others ("dynamic", "longrope") rescale with the sequence length and are computed per step as the reference does.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rotation_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R == rotate_half(x) (transformers' Llama convention: (-x2, x1) for halves x1, x2)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0
    r[idx, idx + half] = 1.0
    return r


def split_attention(q, k, v, past_k, past_v, mask):
    """Attention of one query per request over a past buffer plus the new entry, without joining the two.

    q [B, KV, n_rep, d] (already scaled), k/v [B, KV, 1, d] the new entry, past_k/past_v [B, KV, P, d] the
    cache buffer (unfilled slots masked), mask additive float32 [B, 1, 1, P + 1] (last column: the new entry).
    Returns [B, KV, n_rep, d]. Logits and softmax in float32 at every precision, as the reference's."""
    scores = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], -1)
    weights = torch.softmax(scores.float() + mask, -1).to(v.dtype)
    return torch.matmul(weights[..., :-1], past_v) + weights[..., -1:] * v


class DecodeGraph(nn.Module):
    """The traced module of decode.onnx. Holds the ReducedLlava as `ref` (parameter names, hence the shared
    weights, equal the prefill graph's) and adds the RoPE tables and rotation matrix as its own parameters."""

    def __init__(self, ref: ReducedLlava):
        super().__init__()
        self.ref = ref
        self.num_groups = len(ref.schedule.groups)
        lm = ref.lm
        dtype = next(ref.parameters()).dtype
        d = ref.head_dim
        self.hidden = ref.config.text_config.hidden_size
        self.static_rope = getattr(lm.rotary_emb, "rope_type", "default") in STATIC_ROPE
        fixed = lambda t: nn.Parameter(t.to(dtype), requires_grad=False)  # noqa: E731
        if self.static_rope:
            positions = torch.arange(ref.config.text_config.max_position_embeddings)[None]
            with torch.no_grad():
                cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
            self.rope_cos, self.rope_sin = fixed(cos[0]), fixed(sin[0])  # [max_positions, d]
        self.rope_eye = fixed(torch.eye(d))
        self.rope_rotate = fixed(rotation_matrix(d))

    def forward(self, inputs_embeds, position_ids, *rest):
        masks = list(rest[: self.num_groups])
        flat = rest[self.num_groups:]
        past = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
        logits, new_kv = self.step(inputs_embeds, position_ids, masks, past)
        return (logits, *[t for kv in new_kv for t in kv])

    def step(self, inputs_embeds, position_ids, group_masks, past):
        """ReducedLlava.decode's contract: -> logits [B, V] and every layer's new (key, value) [B, kv_heads, 1, d]."""
        ref = self.ref
        h = inputs_embeds
        scale = ref.lm.layers[0].self_attn.scaling
        rotary = {}
        for off in sorted(set(ref.decode_offsets)):
            rot = self._rotation(h, position_ids - off if off else position_ids)
            rotary[off] = (rot * scale, rot)  # (query's, key's)
        masks = [ref._decode_mask(m) for m in group_masks]
        new_kv = []
        for i, layer in enumerate(ref.lm.layers):
            g = ref.schedule.group_of(i)
            rq, rk = rotary[ref.decode_offsets[g]]
            h, k, v = self._layer(layer, h, rq, rk, masks[g], *past[i])
            new_kv.append((k, v))
        logits = ref.hf.lm_head(ref.lm.norm(h.reshape(-1, self.hidden))).float()
        return logits, new_kv

    def _rotation(self, h, position_ids):
        """Per request the [d, d] matrix M with x @ M == x * cos + rotate_half(x) * sin at its position:
        [B, 1, d, d]."""
        if self.static_rope:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # Gather: [B, 1, d]
        else:
            cos, sin = self.ref.lm.rotary_emb(h, position_ids)
        return self.rope_eye * cos[:, :, None, :] + self.rope_rotate * sin[:, :, None, :]

    def _layer(self, layer, h, rot_q, rot_k, mask, past_k, past_v):
        """One decoder layer for one token per request (h [B, 1, D]): -> h, new key and value [B, KV, 1, d]."""
        ref = self.ref
        attn = layer.self_attn
        heads, kv_heads, d = ref.num_heads, ref.num_kv_heads, ref.head_dim
        x = layer.input_layernorm(h)
        # [B, 1, heads * d] viewed as [B, 1, heads, d]: one token, so no transpose is needed anywhere
        q = torch.matmul(attn.q_proj(x).view(-1, 1, heads, d), rot_q).view(-1, kv_heads, heads // kv_heads, d)
        k = torch.matmul(attn.k_proj(x).view(-1, 1, kv_heads, d), rot_k).view(-1, kv_heads, 1, d)
        v = attn.v_proj(x).view(-1, kv_heads, 1, d)
        o = split_attention(q, k, v, past_k, past_v, mask)
        h = h + attn.o_proj(o.reshape(-1, 1, heads * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v
