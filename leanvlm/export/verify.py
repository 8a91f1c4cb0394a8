"""Check exported graphs: onnx.checker, then one ONNX Runtime run per graph against the reference at
shapes unlike the export example (other batch size, ragged left-padded prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanvlm.errors import EngineError
from leanvlm.reference.model import ReducedLlava, image_starts, prompt_positions

LOGITS_ATOL = 1e-4


@dataclass
class GraphCheck:
    """Max abs difference per output of one graph, and whether kept indices agreed."""

    graph: str
    max_abs: dict[str, float] = field(default_factory=dict)
    kept_equal: bool = True
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)


def synthetic_prompts(ref: ReducedLlava, text_lens: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch: random text tokens around one run of `<image>` tokens, random pixels."""
    g = torch.Generator().manual_seed(seed)
    cfg = ref.config
    n = ref.num_image_tokens
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    vocab = cfg.text_config.vocab_size
    seq = max(text_lens) + n
    ids = torch.full((len(text_lens), seq), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, t in enumerate(text_lens):
        text = torch.randint(5, vocab, (t,), generator=g)
        text[text == ref.image_token_id] = 5
        before = min(3, t - 1)
        row = torch.cat([text[:before], torch.full((n,), ref.image_token_id), text[before:]])
        ids[b, seq - len(row):] = row
        mask[b, seq - len(row):] = 1
    v = cfg.vision_config
    pixels = torch.randn(len(text_lens), 3, v.image_size, v.image_size, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels.to(next(ref.parameters()).dtype),
        "position_ids": prompt_positions(mask),
        "image_start": image_starts(ids, ref.image_token_id, n),
    }


def group_masks(attention_mask: torch.Tensor, group_lengths: list[int], extra: int = 0) -> list[torch.Tensor]:
    """Decode masks per cache group. With left padding the dropped tokens are never pads, so a reduced
    group's mask is the prompt mask cut to that group's length; `extra` ones follow for decoded tokens."""
    ones = attention_mask.new_ones(attention_mask.shape[0], extra)
    return [torch.cat([attention_mask[:, :n], ones], 1) for n in group_lengths]


def check_engine(ref: ReducedLlava, sessions: dict, text_lens: list[int], seed: int = 1,
                 atol: float = LOGITS_ATOL) -> list[GraphCheck]:
    """Run every graph once in ONNX Runtime and compare with the reference; raise EngineError past atol."""
    x = synthetic_prompts(ref, text_lens, seed)
    checks: list[GraphCheck] = []
    with torch.no_grad():
        feats, v_kept, v_targets = ref.vision(x["pixel_values"])
        checks.append(_compare("vision", sessions["vision"], {"pixel_values": x["pixel_values"]},
                               {"image_features": feats, **_indices(ref.schedule.vision_stages, v_kept, v_targets)}))
        embeds = ref.embed(x["input_ids"], feats)
        checks.append(_compare("embed", sessions["embed"], {"input_ids": x["input_ids"], "image_features": feats},
                               {"inputs_embeds": embeds}))
        logits, presents, kept, targets = ref.prefill(embeds, x["attention_mask"], x["position_ids"], x["image_start"])
        expect = {"logits": logits, **_indices(ref.schedule.stages, kept, targets)}
        for i, (k, v) in enumerate(presents):
            expect[f"present.{i}.key"], expect[f"present.{i}.value"] = k, v
        checks.append(_compare("prefill", sessions["prefill"], {
            "inputs_embeds": embeds, "attention_mask": x["attention_mask"],
            "position_ids": x["position_ids"], "image_start": x["image_start"]}, expect))

        lengths = [presents[a][0].shape[2] for a, _, _ in ref.schedule.groups]
        token = logits.argmax(-1, keepdim=True)
        step = ref.embed(token, feats[:, :0])
        pos = x["attention_mask"].sum(1, keepdim=True)
        masks = group_masks(x["attention_mask"], lengths, extra=1)
        dec_logits, new_kv = ref.decode(step, pos, masks, presents)
        feed = {"inputs_embeds": step, "position_ids": pos}
        feed.update({f"attention_mask.{g}": m for g, m in enumerate(masks)})
        expect = {"logits": dec_logits}
        for i, ((pk, pv), (k, v)) in enumerate(zip(presents, new_kv)):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = pk, pv
            expect[f"present.{i}.key"], expect[f"present.{i}.value"] = k, v
        checks.append(_compare("decode", sessions["decode"], feed, expect))

    bad = [c for c in checks if c.worst > atol or not c.kept_equal]
    if bad:
        detail = "; ".join(f"{c.graph}: max |diff| {c.worst:.3g}, kept equal {c.kept_equal}" for c in bad)
        raise EngineError(f"exported graphs disagree with the PyTorch reference (atol {atol}): {detail}")
    return checks


def _indices(stages, kept: list, targets: list) -> dict:
    """Reference index outputs under their graph names (see export.graphs.stage_outputs)."""
    from leanvlm.export.graphs import stage_outputs

    names = stage_outputs(stages)
    return dict(zip(names, [*kept, *targets]))


def _compare(name: str, session, feed: dict, expect: dict) -> GraphCheck:
    declared = {i.name for i in session.get_inputs()}  # unused inputs (image_start at keep 1) are dropped
    inputs = {k: v.numpy() for k, v in feed.items() if k in declared}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    check = GraphCheck(name)
    for key, ref_val in expect.items():
        ref_np = ref_val.numpy()
        out = got[key]
        check.shapes[key] = list(out.shape)
        if out.shape != ref_np.shape:
            raise EngineError(f"{name}.onnx output {key}: shape {list(out.shape)}, reference {list(ref_np.shape)}")
        if key.startswith(("kept_indices", "merge_targets")):
            check.kept_equal &= bool(np.array_equal(out, ref_np))
        else:
            check.max_abs[key] = float(np.abs(out.astype(np.float64) - ref_np).max(initial=0.0))
    return check


def load_sessions(out_dir: Path, providers: list[str] | None = None) -> dict:
    """ONNX Runtime sessions for the four graphs of an engine directory."""
    from leanvlm.engines.onnxruntime import create_session
    from leanvlm.export.graphs import GRAPH_NAMES

    return {g: create_session(Path(out_dir) / f"{g}.onnx", providers) for g in GRAPH_NAMES}
