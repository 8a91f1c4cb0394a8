"""Every preset on the tiny checkpoint: graphs vs the reference, engine vs torch backend, batch of 3."""

import pytest

from conftest import PROMPTS, images
from leanvlm import Pipeline
from leanvlm.errors import UserError
from leanvlm.export.verify import check_engine, load_sessions
from leanvlm.reduction.schedule import FIXED_METHODS, Schedule
from leanvlm.reference import ReducedLlava

PRESETS = list(FIXED_METHODS)  # adaptive needs trained modules: tests/test_adaptive.py


def _schedule(method, keep=0.33):
    return Schedule.preset(method, 4, 64, keep, vision_layers=1)


@pytest.mark.parametrize("method", PRESETS)
@pytest.mark.parametrize("text_lens", [[8], [5, 12, 9]])
def test_preset_graphs_match_reference(engines, hf_model, method, text_lens):
    result = engines(0.33, method=method)
    schedule = _schedule(method)
    assert result.manifest["schedule"]["method"] == method
    checks = {c.graph: c for c in check_engine(ReducedLlava(hf_model, schedule), load_sessions(result.out),
                                               text_lens, seed=5)}
    assert all(c.worst < 1e-4 and c.kept_equal for c in checks.values()), {g: c.worst for g, c in checks.items()}
    assert checks["vision"].shapes["image_features"][1] == schedule.llm_image_tokens
    seq = max(text_lens) + schedule.llm_image_tokens
    for (a, b, n) in schedule.groups:
        assert checks["prefill"].shapes[f"present.{a}.key"][2] == seq - schedule.llm_image_tokens + n


@pytest.mark.parametrize("method", PRESETS)
def test_preset_runtime_matches_torch(engines, method):
    out = engines(0.33, method=method).out
    imgs = images(3)
    a = Pipeline.load(out).generate(images=imgs, prompts=PROMPTS, max_new_tokens=32, ignore_eos=True)
    b = Pipeline.load(out, backend="torch").generate(images=imgs, prompts=PROMPTS, max_new_tokens=32, ignore_eos=True)
    schedule = _schedule(method)
    stages = [*schedule.vision_stages, *schedule.stages]
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and len(x.token_ids) == 32
        assert x.kept == y.kept and x.merged == y.merged
        assert [len(k) for k in x.kept] == [st.num_keep for st in stages]
        for kept, merged, st in zip(x.kept, x.merged, stages):
            if getattr(st, "keep_cls", False):  # VisionZip sends CLS first: it has no patch index
                assert kept[0] == -1
                kept = kept[1:]
            assert all(0 <= i < 64 for i in kept) and len(set(kept)) == len(kept)  # original patch indices
            assert set(merged) <= set(kept) and bool(merged) == st.merges
    assert a[0].kv_cache["used_bytes"] < a[0].kv_cache["unreduced_bytes"]


def test_illava_preset_defaults_for_llava_15():
    s = Schedule.illava(32, 576, 0.33, vision_layers=23)  # CLIP ViT-L/14-336, feature layer -2
    assert [(v.kind, v.layer) for v in s.vision_stages] == [("vit_merge", layer) for layer in (4, 5, 6, 7)]
    assert [v.num_keep for v in s.vision_stages] == [500, 424, 347, 271]  # equal steps to keep / 0.7
    assert [(st.layer, st.num_keep, st.action) for st in s.stages] == [(9, 190, "merge")]


def test_visionzip_preset_is_the_papers_64():
    s = Schedule.visionzip(32, 576, 64 / 576)
    (v,) = s.vision_stages
    # the reference code: 54 dominant = CLS + 53 patches, plus 10 contextual
    assert (v.keep_cls, v.dominant_patches, v.contextual) == (True, 53, 10) and s.llm_image_tokens == 64
    patches_only = Schedule.visionzip(32, 576, 64 / 576, keep_cls=False).vision_stages[0]
    assert (patches_only.dominant_patches, patches_only.contextual) == (54, 10)


def test_visionzip_cls_token_reaches_the_llm_first(hf_model, processor):
    """With keep_cls the first image feature is the projected CLS state of the feature layer (as VisionZip's
    reference code sends it); without it every feature comes from patches."""
    import torch

    pixels = processor(images=images(2), text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        cls_feature = hf_model.model.multi_modal_projector(hidden[:, :1])
        with_cls = ReducedLlava(hf_model, Schedule.visionzip(4, 64, 0.33, vision_layers=1)).vision(pixels)
        without = ReducedLlava(hf_model, Schedule.visionzip(4, 64, 0.33, vision_layers=1, keep_cls=False)).vision(pixels)
    assert torch.allclose(with_cls[0][:, :1], cls_feature, atol=1e-5)
    assert (with_cls[1][0][:, 0] == -1).all() and (without[1][0] >= 0).all()
    assert with_cls[0].shape == without[0].shape  # the same token budget: CLS takes a dominant patch's place


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - {where: vision, layer: 0, keep: 0.5, score: last_token}\n",
     r"stage 0: score 'last_token' is not available where vision \(last_token is a score of llm stages\)"),
    ("stages:\n  - {where: vision, layer: 3, keep: 0.5}\n", r"vision stage 0 .*layer 3 does not exist"),
    ("stages:\n  - {layer: 1, keep: 0.5}\n  - {where: projector, keep: 16}\n", r"stage 1: a projector stage cannot follow"),
    ("stages:\n  - {where: projector, keep: 16, contextual: 16}\n", r"contextual 16 must leave"),
    ("stages:\n  - {where: projector, keep: 16, score_at: current}\n", r"score_at is a field of llm stages"),
    ("stages:\n  - {where: gpu, keep: 16}\n", r"where 'gpu'"),
])
def test_bad_vision_stages(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        Schedule.from_file(path, 4, 64, vision_layers=1)


def test_schedule_file_with_vision_stages(tmp_path, tiny_dir, hf_model):
    from leanvlm.cli import export_engine_main

    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - {where: vision, layer: 0, keep: 40}\n  - {where: projector, keep: 24, contextual: 4}\n"
                    "  - {layer: 2, keep: 12, action: merge}\n")
    out = tmp_path / "eng"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 0
    pipe = Pipeline.load(out)
    res = pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=4)
    assert [len(k) for k in res.kept] == [40, 24, 12] and [len(m) for m in res.merged] == [1, 4, 1]
    ref = ReducedLlava(hf_model, pipe.schedule)
    assert all(c.worst < 1e-4 and c.kept_equal for c in check_engine(ref, load_sessions(out), [4, 9]))


def test_vit_stage_path_equals_hf_when_it_merges_nothing(hf_model, processor):
    """A vit_merge that keeps every token (r = 0) runs the hand-wired CLIP attention + MLP path: its features
    must equal Hugging Face's own vision tower + projector."""
    import torch

    from leanvlm.reduction.schedule import VisionStage

    schedule = Schedule(4, 64, (), "file", (VisionStage("vit_merge", num_keep=64, keep=1.0, layer=0),), 1)
    enc = processor(images=images(2), text=["<image>"] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, (kept,), _ = ReducedLlava(hf_model, schedule).vision(enc["pixel_values"])
        theirs = torch.stack(list(hf_model.model.get_image_features(enc["pixel_values"]).pooler_output))
    assert kept.tolist() == [list(range(64))] * 2
    assert torch.allclose(ours, theirs, atol=1e-5)
