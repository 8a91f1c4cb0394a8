"""Check exported graphs: onnx.checker, then one ONNX Runtime run per graph against the reference at
shapes unlike the export example (other batch size, ragged left-padded prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanvlm.errors import ShapeMismatchError, ToleranceError
from leanvlm.reference.model import ReducedLlava, image_starts, prompt_positions
from leanvlm.spec import names
from leanvlm.spec.precision import PRECISIONS, Precision


@dataclass
class GraphCheck:
    """Max abs difference per output of one graph, and how much of the kept indices agreed."""

    graph: str
    max_abs: dict[str, float] = field(default_factory=dict)
    kept_overlap: float = 1.0  # worst fraction of one row's kept indices also kept by the reference
    shapes: dict[str, list[int]] = field(default_factory=dict)
    reference_max: dict[str, float] = field(default_factory=dict)  # max |reference| per float output

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    @property
    def kept_equal(self) -> bool:
        return self.kept_overlap == 1.0

    def failures(self, precision: Precision) -> list[str]:
        """What exceeds the precision's tolerances, one phrase each."""
        tol = {k: precision.tolerance(k, self.reference_max.get(k, 0.0)) for k in self.max_abs}
        bad = [f"{k} max |diff| {v:.3g} > {tol[k]:.3g}" for k, v in self.max_abs.items() if v > tol[k]]
        if self.kept_overlap < precision.kept_overlap:
            bad.append(f"kept indices overlap {self.kept_overlap:.3f} < {precision.kept_overlap:g}")
        return bad


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
        "pixel_values": pixels,  # float32: the reference runs in float32 (float32_compute for half models)
        "position_ids": prompt_positions(mask),
        "image_start": image_starts(ids, ref.image_token_id, n),
    }


def group_masks(attention_mask: torch.Tensor, group_lengths: list[int], extra: int = 0) -> list[torch.Tensor]:
    """Decode masks per cache group. With left padding the dropped tokens are never pads, so a reduced
    group's mask is the prompt mask cut to that group's length; `extra` ones follow for decoded tokens."""
    ones = attention_mask.new_ones(attention_mask.shape[0], extra)
    return [torch.cat([attention_mask[:, :n], ones], 1) for n in group_lengths]


@dataclass
class GraphCase:
    """One graph's check: the feed and the reference outputs (numpy), computed before any session opens.
    stage_layers: the decoder layer each LLM stage acts at (prefill: which KV a flipped selection changes)."""

    graph: str
    feed: dict
    expect: dict
    stage_layers: tuple[int, ...] = ()


def reference_cases(ref: ReducedLlava, text_lens: list[int], seed: int = 1) -> list[GraphCase]:
    """Feeds and reference outputs for every graph on a ragged, left-padded synthetic batch: the reference
    model is not needed afterwards (export frees it before opening sessions)."""
    from leanvlm.reference.model import float32_compute

    x = synthetic_prompts(ref, text_lens, seed)
    np_ = lambda d: {k: v.detach().cpu().numpy() for k, v in d.items()}  # noqa: E731
    with torch.no_grad(), float32_compute(ref):
        feats, v_kept, v_targets = ref.vision(x["pixel_values"])
        cases = [GraphCase("vision", np_({names.PIXEL_VALUES: x["pixel_values"]}),
                           np_({names.IMAGE_FEATURES: feats, **_indices(ref.schedule.vision_stages, v_kept,
                                                                        v_targets)}))]
        embeds = ref.embed(x["input_ids"], feats)
        cases.append(GraphCase("embed", np_({names.INPUT_IDS: x["input_ids"], names.IMAGE_FEATURES: feats}),
                               np_({names.INPUTS_EMBEDS: embeds})))
        logits, presents, kept, targets = ref.prefill(embeds, x["attention_mask"], x["position_ids"], x["image_start"])
        cases.append(GraphCase("prefill", np_({
            names.INPUTS_EMBEDS: embeds, names.ATTENTION_MASK: x["attention_mask"],
            names.POSITION_IDS: x["position_ids"], names.IMAGE_START: x["image_start"]}),
            np_({names.LOGITS: logits, **_indices(ref.schedule.stages, kept, targets),
                 **_kv(names.present_names(len(presents)), presents)}),
            tuple(st.layer for st in ref.schedule.stages)))

        lengths = [presents[a][0].shape[2] for a, _, _ in ref.schedule.groups]
        step = ref.embed(logits.argmax(-1, keepdim=True), feats[:, :0])
        pos = x["attention_mask"].sum(1, keepdim=True)
        masks = group_masks(x["attention_mask"], lengths, extra=1)
        adaptive = [st.adaptive for st in ref.schedule.stages]
        if any(adaptive):  # masked slots inside the image span of the groups after an adaptive stage
            from leanvlm.models.layout import group_prompt_masks

            prompt = group_prompt_masks(x["attention_mask"].numpy(), x["image_start"].numpy(),
                                        ref.num_image_tokens, [k.numpy() for k in kept], adaptive)
            masks = [torch.cat([torch.from_numpy(p), m[:, -1:]], 1) for p, m in zip(prompt, masks)]
        dec_logits, new_kv = ref.decode(step, pos, masks, presents)
        cases.append(GraphCase("decode", np_({names.INPUTS_EMBEDS: step, names.POSITION_IDS: pos,
                                              **{names.decode_mask_name(g): m for g, m in enumerate(masks)},
                                              **_kv(names.past_names(len(presents)), presents)}),
                               np_({names.LOGITS: dec_logits, **_kv(names.present_names(len(new_kv)), new_kv)})))
    return cases


def compare_cases(cases: list[GraphCase], session_for, precision: Precision = PRECISIONS["fp32"]) -> list[GraphCheck]:
    """Run each case's graph (`session_for(graph)` returns an ONNX Runtime session, opened and released one
    graph at a time) and compare; raise ShapeMismatchError on a wrong output shape, ToleranceError past the
    precision's tolerances."""
    checks = []
    for case in cases:
        session = session_for(case.graph)
        checks.append(_compare(case, session))
        del session
    bad = {c.graph: c.failures(precision) for c in checks}
    bad = {g: f for g, f in bad.items() if f}
    if bad:
        detail = "; ".join(f"{g}: {', '.join(f)}" for g, f in bad.items())
        raise ToleranceError(f"exported graphs disagree with the PyTorch reference ({precision.name} tolerances): "
                             f"{detail}")
    return checks


def check_engine(ref: ReducedLlava, sessions: dict, text_lens: list[int], seed: int = 1,
                 precision: Precision = PRECISIONS["fp32"]) -> list[GraphCheck]:
    """Run every graph once in ONNX Runtime and compare with the reference (see compare_cases)."""
    return compare_cases(reference_cases(ref, text_lens, seed), sessions.__getitem__, precision)


def _kv(kv_names: list[str], pairs) -> dict:
    """(key, value) pairs per layer under their flat names (names.past_names / present_names order)."""
    return dict(zip(kv_names, [t for kv in pairs for t in kv]))


def _indices(stages, kept: list, targets: list) -> dict:
    """Reference index outputs under their graph names (see export.graphs.stage_outputs)."""
    from leanvlm.export.graphs import stage_outputs

    return dict(zip(stage_outputs(stages), [*kept, *targets]))


def _compare(case: GraphCase, session) -> GraphCheck:
    """One graph against its reference outputs. Float inputs are cast to the graph's own input types (half
    precision graphs take half inputs). KV entries after a stage whose kept indices differ from the
    reference's hold other tokens, so they are not compared (the overlap is what such a check reports)."""
    name = case.graph
    types = {i.name: i.type for i in session.get_inputs()}  # unused inputs (image_start at keep 1) are dropped
    inputs = {k: v.astype(_NP_TYPES.get(types[k], v.dtype)) if v.dtype.kind == "f" else v
              for k, v in case.feed.items() if k in types}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    check = GraphCheck(name)
    for key, ref_np in case.expect.items():
        check.shapes[key] = list(got[key].shape)
        if got[key].shape != ref_np.shape:
            raise ShapeMismatchError(f"{name}.onnx output {key}: shape {list(got[key].shape)}, reference "
                                     f"{list(ref_np.shape)}")
    flipped_from = None  # first decoder layer whose KV depends on a selection that differs
    for j, layer in enumerate(case.stage_layers):
        key = f"{names.KEPT_INDICES}.{j}"
        if key in got and not np.array_equal(got[key], case.expect[key]):
            flipped_from = layer
            break
    for key, ref_np in case.expect.items():
        out = got[key]
        if names.is_index_output(key):
            check.kept_overlap = min(check.kept_overlap, index_overlap(out, ref_np))
        elif flipped_from is None or not key.startswith("present.") or int(key.split(".")[1]) < flipped_from:
            check.max_abs[key] = float(np.abs(out.astype(np.float64) - ref_np).max(initial=0.0))
            check.reference_max[key] = float(np.abs(ref_np).max(initial=0.0))
    return check


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def index_overlap(got: np.ndarray, expected: np.ndarray) -> float:
    """Worst row's fraction of `expected` indices [B, k] that `got` also holds (as sets: 1.0 when equal)."""
    if expected.size == 0:
        return 1.0
    return min(len(set(a.tolist()) & set(b.tolist())) / max(len(set(b.tolist())), 1)
               for a, b in zip(got.reshape(got.shape[0], -1), expected.reshape(expected.shape[0], -1)))


def load_sessions(out_dir: Path, providers: list[str] | None = None) -> dict:
    """ONNX Runtime sessions for the four graphs of an engine directory."""
    from leanvlm.engines.onnxruntime import create_session

    return {g: create_session(Path(out_dir) / names.graph_file(g), providers) for g in names.GRAPH_NAMES}
