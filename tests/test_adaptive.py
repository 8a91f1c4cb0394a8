"""Adaptive (ATP-style) stages: per-sample counts in the reference, the exported graphs with K = the batch's largest
count (and --static-cap), the runtime's KV masks and kept counts, the shipped modules, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import images
from leanvlm.cli import export_engine_main, main
from leanvlm.errors import UserError
from leanvlm.reduction import atp
from leanvlm.reduction.schedule import Schedule, adaptive_stage

N_TINY = 64  # tiny-llava's image tokens


def _module(hidden: int, seed: int = 0) -> atp.ATPModule:
    """A deterministic untrained module whose threshold varies with the input (so counts differ per sample)."""
    torch.manual_seed(seed)
    m = atp.ATPModule(hidden)
    with torch.no_grad():
        m.head[2].weight.mul_(5.0)
        m.head[2].bias.fill_(-0.5)
    return m.eval()


@pytest.fixture(scope="module")
def atp_dir(tiny_dir, tmp_path_factory):
    """tiny-llava with an ATP module for an adaptive stage at layer 2 (cap 32, min 6, 4 spatial tokens)."""
    d = tmp_path_factory.mktemp("atp") / "tiny-atp"
    shutil.copytree(tiny_dir, d)
    atp.save_atp(d, {2: _module(64)}, {"hidden_size": 64, "num_layers": 4, "num_image_tokens": N_TINY,
                                       "stages": [{"layer": 2, "cap": 32, "min": 6, "spatial": 4}],
                                       "target_keep": 0.25, "measured": {"mean_kept": 17.5, "data": "test"}})
    return d


@pytest.fixture(scope="module")
def atp_ref(atp_dir):
    from leanvlm.models import load_model
    from leanvlm.reference import ReducedLlava

    model = load_model(str(atp_dir)).model
    schedule = atp.adaptive_schedule(atp_dir, 4, N_TINY)
    return ReducedLlava(model, schedule).eval()


def _prefill(ref, text_lens, seed=3):
    from leanvlm.export.verify import synthetic_prompts

    x = synthetic_prompts(ref, text_lens, seed)
    with torch.no_grad():
        emb = ref.embed(x["input_ids"], ref.vision(x["pixel_values"])[0])
        return x, emb, ref.prefill(emb, x["attention_mask"], x["position_ids"], x["image_start"])


def test_batch_runs_the_largest_count_and_masks_each_sample_to_its_own(atp_ref):
    x, emb, (logits, presents, kept, _) = _prefill(atp_ref, [5, 12, 9, 7])
    counts = (kept[0] >= 0).sum(1)
    assert len(set(counts.tolist())) > 1, "the test needs samples with different counts"
    assert kept[0].shape[1] == counts.max()  # K = the batch's largest count
    assert presents[2][0].shape[2] == emb.shape[1] - N_TINY + counts.max()
    spatial = set(atp.spatial_indices(N_TINY, 4))
    for b in range(4):
        n = int(x["attention_mask"][b].sum())
        cut = emb.shape[1] - n
        with torch.no_grad():
            lb, pb, kb, _ = atp_ref.prefill(emb[b:b + 1, cut:], x["attention_mask"][b:b + 1, cut:],
                                            x["position_ids"][b:b + 1, cut:], x["image_start"][b:b + 1] - cut)
        mine = kept[0][b][kept[0][b] >= 0]
        assert kb[0].shape[1] == counts[b]  # alone, a sample runs exactly its own count
        assert torch.equal(kb[0][0], mine)
        assert spatial <= set(mine.tolist())  # SAP: the grid tokens are always kept
        assert 6 <= counts[b] <= 32
        torch.testing.assert_close(lb[0], logits[b], atol=2e-5, rtol=1e-4)


def test_static_cap_runs_the_cap_with_the_same_result(atp_ref):
    from dataclasses import replace

    from leanvlm.reference import ReducedLlava

    static = replace(atp_ref.schedule, stages=tuple(replace(s, static=True) for s in atp_ref.schedule.stages))
    ref = ReducedLlava(atp_ref.hf, static, {2: atp_ref.atp["2"]}).eval()
    _, _, (logits, _, kept, _) = _prefill(atp_ref, [5, 12, 9])
    _, _, (s_logits, _, s_kept, _) = _prefill(ref, [5, 12, 9])
    assert s_kept[0].shape[1] == 32
    for a, b in zip(kept[0], s_kept[0]):
        assert torch.equal(a[a >= 0], b[b >= 0])
    torch.testing.assert_close(s_logits, logits, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def adaptive_engines(atp_dir, tmp_path_factory):
    from leanvlm.export import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("adaptive-engines")
    return {mode: export_engine(ExportOptions(model=str(atp_dir), method="adaptive", out=root / mode, max_batch=4,
                                              static_cap=mode == "static"))
            for mode in ("dynamic", "static")}


def test_export_k_is_data_dependent_and_static_cap_is_constant(adaptive_engines):
    from leanvlm.engines.trt_lint import DYNAMIC_K, topk_ks

    dynamic, static = adaptive_engines["dynamic"], adaptive_engines["static"]
    assert any(DYNAMIC_K in issue for issue in dynamic.lint)
    assert not any("TopK" in issue for issue in static.lint)
    assert 32 in topk_ks(static.out / "prefill.onnx")
    io = {o["name"]: o["shape"] for o in dynamic.manifest["graphs"]["prefill"]["outputs"]}
    assert io["kept_indices.0"] == ["batch_size", "adaptive_tokens_0"]
    assert dynamic.manifest["schedule"]["stages"][0]["kind"] == "adaptive"


def test_engine_matches_reference_at_batch_1_and_batch_3(adaptive_engines):
    from leanvlm.runtime import Pipeline

    ims, prompts = images(3, size=32), ["What is in the picture?", "Is there a red circle?", "Describe it."]
    for mode in ("dynamic", "static"):
        out = adaptive_engines[mode].out
        eng, ref = Pipeline.load(out), Pipeline.load(out, backend="torch")
        batch = eng.generate(images=ims, prompts=prompts, max_new_tokens=6, ignore_eos=True)
        expect = ref.generate(images=ims, prompts=prompts, max_new_tokens=6, ignore_eos=True)
        singles = [eng.generate(image=i, prompt=p, max_new_tokens=6, ignore_eos=True) for i, p in zip(ims, prompts)]
        counts = [r.kept_counts[0] for r in batch]
        assert len(set(counts)) > 1, "the test needs requests with different counts"
        for b, e, s in zip(batch, expect, singles):
            assert b.kept == e.kept == s.kept and b.kept_counts == s.kept_counts
            assert len(b.kept[0]) == b.kept_counts[0]
            assert b.token_ids == e.token_ids == s.token_ids
        # the KV cache after the stage holds the batch's K, a single request its own count (dynamic only)
        after = [r.kv_cache["lengths"][1] - r.kv_cache["lengths"][0] for r in singles]
        if mode == "dynamic":
            assert after == [c - N_TINY for c in counts]
        else:
            assert after == [32 - N_TINY] * 3


def test_runtime_parity_report_passes(adaptive_engines):
    from leanvlm.runtime.parity import run_parity

    report = run_parity(adaptive_engines["dynamic"].out, samples=3, steps=4)
    assert report.passed and report.kept_agreement == 1.0


def test_plan_reports_cap_and_measured_mean(capsys, atp_dir):
    assert main(["plan", "--model", str(atp_dir), "--method", "adaptive", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adaptive"]["stages"][0] == {"layer": 2, "cap": 32, "min": 6, "spatial": 4, "static": False,
                                            "measured_mean_kept": 17.5}
    assert out["image_tokens_per_layer"] == [64, 64, 32, 32]
    assert out["adaptive"]["prefill_flops_ratio_at_measured_mean"] < out["prefill_flops_ratio"]


def test_spatial_indices_are_a_uniform_grid():
    assert atp.spatial_indices(144, 9) == [26, 30, 34, 74, 78, 82, 122, 126, 130]
    assert atp.spatial_indices(64, 4) == [18, 22, 50, 54]
    assert atp.spatial_indices(10, 3) == [1, 5, 8]


# ---- bad input --------------------------------------------------------------------------------------------
BAD = {
    "vision": ("stages:\n  - {where: vision, layer: 1, kind: adaptive, cap: 0.5}\n",
               r"stage 0: an adaptive stage acts between LLM decoder layers"),
    "cap below min": ("stages:\n  - {layer: 2, kind: adaptive, cap: 8, min: 12}\n",
                      r"stage 0 \(layer 2\): cap 8 < min 12"),
    "spatial above min": ("stages:\n  - {layer: 2, kind: adaptive, cap: 30, min: 4, spatial: 9}\n",
                          r"spatial 9 > min 4"),
    "keep on adaptive": ("stages:\n  - {layer: 2, kind: adaptive, cap: 30, keep: 0.5}\n",
                         r"keep is not a field of adaptive stages"),
    "fixed after adaptive": ("stages:\n  - {layer: 1, kind: adaptive, cap: 30}\n  - {layer: 2, keep: 10}\n",
                             r"stage 1 \(layer 2\): a fixed-count stage cannot follow an adaptive one"),
    "cap on fixed": ("stages:\n  - {layer: 2, keep: 0.5, cap: 10}\n", r"cap is a field of adaptive stages"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adaptive_schedules(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        Schedule.from_file(path, 4, 64)


def test_adaptive_in_the_vision_encoder_exits_2(capsys, tmp_path, tiny_dir):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {where: vision, layer: 0, kind: adaptive, cap: 10}\n")
    out = tmp_path / "never"
    assert export_engine_main(["--model", str(tiny_dir), "--schedule", str(path), "--out", str(out)]) == 2
    assert "stage 0: an adaptive stage acts between LLM decoder layers" in capsys.readouterr().err
    assert not out.exists()


def test_modules_that_do_not_match_the_model(tmp_path, atp_dir, tiny_dir, capsys):
    from leanvlm.models import load_model

    model = load_model(str(tiny_dir)).model
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    record = {"hidden_size": 32, "num_layers": 4, "stages": [{"layer": 2, "cap": 32, "min": 6, "spatial": 4}]}
    atp.save_atp(wrong, {2: atp.ATPModule(32)}, record)
    schedule = Schedule(4, N_TINY, (adaptive_stage(2, 32, 6, 4, False, N_TINY),))
    with pytest.raises(UserError, match="trained for hidden size 32, the model has 64"):
        atp.load_atp(wrong, model.config, schedule)
    atp.save_atp(wrong, {2: atp.ATPModule(32)}, {**record, "hidden_size": 64})
    with pytest.raises(UserError, match=r"stage 0 \(adaptive, layer 2\): layers.2.head.0.weight has shape"):
        atp.load_atp(wrong, model.config, schedule)
    other_layer = Schedule(4, N_TINY, (adaptive_stage(1, 32, 6, 4, False, N_TINY),))
    with pytest.raises(UserError, match=r"stage 0 \(adaptive, layer 1\): no ATP module was trained for layer 1"):
        atp.load_atp(atp_dir, model.config, other_layer)
    with pytest.raises(UserError, match="no trained ATP modules"):
        atp.load_atp(tiny_dir, model.config, schedule)
    # through the CLI: exit 2, one error line, nothing written
    out = tmp_path / "never"
    assert export_engine_main(["--model", str(tiny_dir), "--method", "adaptive", "--out", str(out)]) == 2
    assert "no trained ATP modules" in capsys.readouterr().err and not out.exists()
    assert export_engine_main(["--model", str(tiny_dir), "--keep", "0.5", "--static-cap", "--out", str(out)]) == 2
    assert "--static-cap applies to adaptive stages" in capsys.readouterr().err
    assert export_engine_main(["--model", str(atp_dir), "--method", "adaptive", "--exporter", "dynamo",
                               "--out", str(out)]) == 2
    assert "torchscript exporter only" in capsys.readouterr().err and not out.exists()


def test_shipped_shapes_llava_modules_load_and_record_their_training():
    from transformers import LlavaConfig

    from leanvlm.models.loading import resolve_model

    path = resolve_model("shapes-llava")
    record = atp.read_record(path)
    cfg = LlavaConfig.from_pretrained(path)
    schedule = atp.adaptive_schedule(path, cfg.text_config.num_hidden_layers, 144)
    modules = atp.load_atp(path, cfg, schedule)
    assert set(modules) == {st.layer for st in schedule.stages}
    assert record["training"]["command"].startswith("python tools/train_atp.py")
    assert 0 < record["measured"]["mean_kept"] <= max(st.num_keep for st in schedule.stages)
    assert np.isclose(record["measured"]["mean_keep_ratio"], record["measured"]["mean_kept"] / 144, atol=1e-3)


@pytest.mark.tensorrt
def test_tensorrt_parses_the_static_cap_graphs(adaptive_engines):
    import tensorrt as trt

    from leanvlm.spec.names import GRAPH_NAMES

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    for graph in GRAPH_NAMES:
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(adaptive_engines["static"].out / f"{graph}.onnx"))
        assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
