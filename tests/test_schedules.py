"""Multi-stage schedules: PyramidDrop preset, schedule files, and their parity through export and runtime."""

import json

import pytest
import torch

from conftest import PROMPTS, chat, images
from leanvlm import Pipeline
from leanvlm.cli import export_engine_main
from leanvlm.errors import UserError
from leanvlm.export.verify import check_engine, load_sessions
from leanvlm.reduction import select
from leanvlm.reduction.schedule import Schedule
from leanvlm.reference import ReducedLlava
from leanvlm.reference.model import image_starts, prompt_positions


def test_pdrop_preset_is_the_papers_llava_schedule():
    s = Schedule.pdrop(32, 576, 0.125)
    assert [(st.layer, st.num_keep) for st in s.stages] == [(8, 288), (16, 144), (24, 72)]
    assert all(st.score_at == "current" and st.positions == "renumber" for st in s.stages)
    assert s.groups == [(0, 8, 576), (8, 16, 288), (16, 24, 144), (24, 32, 72)]
    scaled = Schedule.pdrop(32, 576, 0.33)
    assert [st.num_keep for st in scaled.stages] == [int(576 * 0.33 ** (j / 3)) for j in (1, 2, 3)]


def test_pdrop_counts_truncate_like_the_reference_code():
    """PyramidDrop's code keeps int(N * ratio) (FastV's rounds): at 144 tokens, keep 0.33 -> 99/68/47."""
    assert [st.num_keep for st in Schedule.pdrop(4, 144, 0.33).stages] == [99, 68, 47]
    assert [st.num_keep for st in Schedule.fastv(4, 144, 0.33).stages] == [48]


def test_pdrop_decode_positions_follow_each_groups_renumbered_prompt():
    """The reference numbers a new token P+t in layers 0-7, P+t-288 in 8-15, P+t-432, P+t-504 (576 tokens,
    keep 0.125): right after each group's renumbered prompt. `decode_positions: prompt` keeps P+t everywhere."""
    from dataclasses import replace

    s = Schedule.pdrop(32, 576, 0.125)
    assert s.decode_positions == "group" and s.decode_position_offsets() == [0, 288, 432, 504]
    assert replace(s, decode_positions="prompt").decode_position_offsets() == [0, 0, 0, 0]
    assert Schedule.fastv(32, 576, 0.33).decode_position_offsets() == [0, 0]  # FastV keeps original positions


def test_decode_positions_prompt_option_end_to_end(tmp_path, tiny_dir, hf_model):
    path = tmp_path / "s.yaml"
    path.write_text("decode_positions: prompt\nstages:\n  - {layer: 2, keep: 16, score_at: current, "
                    "positions: renumber}\n")
    out = tmp_path / "eng"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 0
    m = json.loads((out / "leanvlm.json").read_text())
    assert m["schedule"]["decode_positions"] == "prompt"
    assert [g["decode_position_offset"] for g in m["cache_groups"]] == [0, 0]
    imgs = images(2)
    a = Pipeline.load(out).generate(images=imgs, prompts=PROMPTS[:2], max_new_tokens=10, ignore_eos=True)
    b = Pipeline.load(out, backend="torch").generate(images=imgs, prompts=PROMPTS[:2], max_new_tokens=10,
                                                     ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    path.write_text(path.read_text().replace("prompt", "group"))
    grouped = ReducedLlava(hf_model, Schedule.from_file(path, 4, 64))
    assert grouped.decode_offsets == [0, 48]
    assert ReducedLlava(hf_model, Schedule.from_dict(m["schedule"])).decode_offsets == [0, 0]


def test_renumber_positions_are_contiguous_after_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert select.renumber_positions(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def _eager_run(tiny_dir, processor, schedule, attention_layer: int):
    """A one-stage schedule on HF's eager model over the 3-prompt batch: (kept [B, k], HF's own attention
    probabilities at `attention_layer` [B, H, L, L], the batch, image starts)."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    enc = processor(images=images(3), text=[chat(processor, p) for p in PROMPTS], return_tensors="pt", padding=True)
    ref = ReducedLlava(eager, schedule)
    pos = prompt_positions(enc["attention_mask"])
    start = image_starts(enc["input_ids"], ref.image_token_id, 64)
    with torch.no_grad():
        embeds = ref.embed(enc["input_ids"], ref.vision(enc["pixel_values"])[0])
        _, _, (kept,), _ = ref.prefill(embeds, enc["attention_mask"], pos, start)
        att = eager(**enc, position_ids=pos, output_attentions=True).attentions[attention_layer]
    return kept, att, enc, start


def test_pdrop_first_stage_matches_hf_eager_attention_of_that_layer(tiny_dir, processor):
    """score_at current: the ranking is the drop layer's own attention (last row, head mean) over its input."""
    schedule = Schedule(4, 64, (Schedule.pdrop(4, 64, 0.125).stages[0],), "pdrop")
    kept, att, enc, start = _eager_run(tiny_dir, processor, schedule, attention_layer=1)
    clear = 0
    for b in range(3):
        scores = att[b, :, -1].mean(0)[start[b]: start[b] + 64]
        order = scores.sort(descending=True).values
        if order[31] - order[32] > 1e-6:
            assert set(kept[b].tolist()) == set(scores.topk(32).indices.tolist())
            clear += 1
    assert clear >= 2


@pytest.fixture(scope="module")
def pdrop_engine(engines):
    return engines(0.125, method="pdrop")


@pytest.mark.parametrize("text_lens", [[7], [5, 12, 9]])
def test_pdrop_graphs_match_reference(pdrop_engine, hf_model, text_lens):
    ref = ReducedLlava(hf_model, Schedule.pdrop(4, 64, 0.125))
    checks = check_engine(ref, load_sessions(pdrop_engine.out), text_lens, seed=11)
    assert all(c.worst < 1e-4 and c.kept_equal for c in checks)
    prefill = next(c for c in checks if c.graph == "prefill")
    seq = max(text_lens) + 64
    assert [prefill.shapes[f"present.{i}.key"][2] for i in range(4)] == [seq, seq - 32, seq - 48, seq - 56]
    assert [prefill.shapes[f"kept_indices.{s}"][1] for s in range(3)] == [32, 16, 8]


def test_pdrop_runtime_matches_torch_and_nests_kept(pdrop_engine):
    imgs = images(3)
    a = Pipeline.load(pdrop_engine.out).generate(images=imgs, prompts=PROMPTS, max_new_tokens=32, ignore_eos=True)
    b = Pipeline.load(pdrop_engine.out, backend="torch").generate(images=imgs, prompts=PROMPTS, max_new_tokens=32,
                                                                   ignore_eos=True)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.kept == y.kept
        assert [len(k) for k in x.kept] == [32, 16, 8]
        assert set(x.kept[2]) <= set(x.kept[1]) <= set(x.kept[0])  # later stages choose among survivors
    seq = len(a[0].prompt_token_ids)  # the request's own prompt: batch pads are not cached
    assert a[0].kv_cache["lengths"] == [seq + 31, seq - 32 + 31, seq - 48 + 31, seq - 56 + 31]


def test_schedule_file_mixed_stages(tmp_path, tiny_dir, hf_model):
    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - {layer: 1, keep: 0.5}\n  - {layer: 3, keep: 12, score_at: current, positions: renumber}\n")
    out = tmp_path / "eng"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 0
    m = json.loads((out / "leanvlm.json").read_text())
    stages = m["schedule"]["stages"]
    assert [(s["layer"], s["num_keep"], s["score_at"], s["positions"]) for s in stages] == [
        (1, 32, "previous", "keep"), (3, 12, "current", "renumber")]
    assert m["schedule"]["method"] == "file"
    ref = ReducedLlava(hf_model, Schedule.from_dict(m["schedule"]))
    assert all(c.worst < 1e-4 and c.kept_equal for c in check_engine(ref, load_sessions(out), [6, 10, 3]))


def test_json_schedule_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"stages": [{"layer": 2, "keep": 0.25}]}))
    s = Schedule.from_file(path, 4, 64)
    assert s.stages[0].num_keep == 16 and s.stages[0].score_at == "previous"


BAD_SCHEDULES = {
    "increasing": ("stages:\n  - {layer: 1, keep: 0.25}\n  - {layer: 2, keep: 0.5}\n", r"stage 1 \(layer 2\).*increase"),
    "keeps zero": ("stages:\n  - {layer: 1, keep: 0.001}\n", r"stage 0 \(layer 1\).*rounds to 0"),
    "no such layer": ("stages:\n  - {layer: 9, keep: 0.5}\n", r"stage 0 \(layer 9\): layer 9 does not exist"),
    "layer zero": ("stages:\n  - {layer: 0, keep: 0.5}\n", r"stage 0 \(layer 0\): layer 0 does not exist"),
    "out of order": ("stages:\n  - {layer: 2, keep: 0.5}\n  - {layer: 1, keep: 0.25}\n", r"stage 1 .*after"),
    "unknown field": ("stages:\n  - {layer: 1, keep: 0.5, colour: red}\n", r"stage 0: unknown field.*colour"),
    "bad score_at": ("stages:\n  - {layer: 1, keep: 0.5, score_at: later}\n", r"stage 0 .*score_at 'later'"),
    "bad positions": ("stages:\n  - {layer: 1, keep: 0.5, positions: shuffle}\n", r"stage 0 .*positions 'shuffle'"),
    "missing keep": ("stages:\n  - {layer: 1}\n", r"stage 0: needs 'layer' and 'keep'"),
    "keep string": ("stages:\n  - {layer: 1, keep: half}\n", r"stage 0: keep 'half' is not a number"),
    "keep too big": ("stages:\n  - {layer: 1, keep: 1.5}\n", r"stage 0: keep 1.5 must be a fraction"),
    "no stages": ("method: fastv\n", r"expected a mapping with a 'stages' list"),
    "not yaml": ("stages: [ {layer: 1\n", r"not valid YAML/JSON"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULES))
def test_bad_schedule_files(tmp_path, case):
    text, message = BAD_SCHEDULES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        Schedule.from_file(path, 4, 64)


def test_bad_schedule_cli_exit_2_no_output(capsys, tmp_path, tiny_dir):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {layer: 1, keep: 0.25}\n  - {layer: 2, keep: 0.5}\n")
    out = tmp_path / "never"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "stage 1 (layer 2)" in err[0]
    assert not out.exists()
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--keep", "0.5", "--out", str(out)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_pdrop_needs_four_layers():
    with pytest.raises(UserError, match="at least 4 decoder layers"):
        Schedule.pdrop(3, 64, 0.125)


@pytest.mark.parametrize("method, keep", [("pdrop", 0.125), ("fastv", 0.33), ("illava", 0.33), ("visionzip", 0.33)])
def test_plan_counts_match_exported_graph_shapes(engines, hf_model, method, keep):
    from leanvlm.reduction.plan import make_plan

    result = engines(keep, method=method)
    schedule = Schedule.preset(method, 4, 64, keep, vision_layers=1)
    checks = {c.graph: c for c in check_engine(ReducedLlava(hf_model, schedule), load_sessions(result.out), [9])}
    plan = make_plan(hf_model.config, schedule, text_tokens=9)
    assert [checks["prefill"].shapes[f"present.{i}.key"][2] for i in range(4)] == plan.llm_tokens_per_layer
    assert checks["vision"].shapes["image_features"][1] == plan.image_tokens_per_layer[0]  # what enters the LLM
    assert plan.vision_tokens_per_layer == [65]  # the tiny tower runs one layer: 64 patches + CLS
    assert plan.kv_bytes < plan.kv_bytes_unreduced and plan.prefill_flops_ratio < 1
    at_64 = make_plan(hf_model.config, schedule, text_tokens=64)  # the manifest's ratio is taken at 64 text tokens
    assert at_64.prefill_flops_ratio == pytest.approx(result.manifest["schedule"]["prefill_flops_ratio"], rel=1e-9)


def test_plan_cli_json(capsys, tiny_dir):
    from leanvlm.cli import main

    assert main(["plan", "--model", str(tiny_dir), "--method", "pdrop", "--keep", "0.125", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["image_tokens_per_layer"] == [64, 32, 16, 8]
    assert d["llm_tokens_per_layer"] == [64 + 64, 64 + 32, 64 + 16, 64 + 8]
    assert 0 < d["prefill_flops_ratio"] < 1 and d["vision_flops_ratio"] == 1
    assert main(["plan", "--model", str(tiny_dir), "--method", "pdrop", "--keep", "0"]) == 2


@pytest.mark.parametrize("alias, layers, hidden", [("llava-7b", 32, 4096), ("llava-13b", 40, 5120)])
def test_plan_works_offline_for_the_aliases(capsys, alias, layers, hidden):
    """No checkpoint in the cache (the hub is never reached in tests): the shipped config.json answers."""
    from leanvlm.cli import main

    assert main(["plan", "--model", alias, "--keep", "0.33", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schedule"]["num_layers"] == layers and d["schedule"]["num_image_tokens"] == 576
    assert len(d["vision_tokens_per_layer"]) == 23 and d["image_tokens_per_layer"][-1] == 190
    per_token_kv = 2 * hidden * layers * 2  # fp16 keys and values of every layer
    assert d["kv_bytes_unreduced"] == per_token_kv * (64 + 576)


def test_7b_shaped_checkpoints_have_the_aliases_layer_shapes():
    from leanvlm.models.loading import load_config
    from leanvlm.models.tiny import build_llava

    real = load_config("llava-7b")
    model, _ = build_llava(0, "llava-7b-shape", random_spread=False, device="meta", text_layers=1)
    made = model.config
    keys = {"vision_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                              "image_size", "patch_size"),
            "text_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                            "vocab_size", "max_position_embeddings")}
    for part, names in keys.items():
        for key in names:
            assert getattr(getattr(made, part), key) == getattr(getattr(real, part), key), (part, key)
    assert made.text_config.num_hidden_layers == 1 and made.vision_feature_layer == real.vision_feature_layer


def test_mean_received_score_matches_hf_eager_attention(tmp_path, tiny_dir, processor, hf_model):
    """score mean_received (FastV's paper text): attention each image token receives in layer K-1, averaged
    over heads and over every non-pad query; checked against HF eager attentions, then exported."""
    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - {layer: 2, keep: 0.25, score: mean_received}\n")
    schedule = Schedule.from_file(path, 4, 64)
    assert schedule.stages[0].score == "mean_received"
    kept, att, enc, start = _eager_run(tiny_dir, processor, schedule, attention_layer=1)
    clear = 0
    for b in range(3):
        rows = enc["attention_mask"][b].bool()
        scores = att[b].mean(0)[rows].mean(0)[start[b]: start[b] + 64]
        order = scores.sort(descending=True).values
        if order[15] - order[16] > 1e-6:
            assert set(kept[b].tolist()) == set(scores.topk(16).indices.tolist())
            clear += 1
    assert clear >= 2
    out = tmp_path / "eng"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 0
    assert all(c.worst < 1e-4 and c.kept_equal for c in check_engine(ReducedLlava(hf_model, schedule),
                                                                     load_sessions(out), [5, 12, 9]))


def test_mean_received_needs_previous_layer(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - {layer: 2, keep: 0.25, score: mean_received, score_at: current}\n")
    with pytest.raises(UserError, match=r"stage 0 \(layer 2\): score mean_received .*score_at: previous"):
        Schedule.from_file(path, 4, 64)
