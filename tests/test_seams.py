"""The seams the next capabilities plug into: backend registry, typed engine spec and its schema policy,
torch-free runtime, processor parity with transformers, in-memory Pipelines, precision plumbing."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import PROMPTS, chat, images
from leanvlm import Pipeline
from leanvlm.errors import EngineError, UserError
from leanvlm.reduction.schedule import Schedule
from leanvlm.runtime.backends import Backend, backend_class, backend_names, make_backend, register_backend
from leanvlm.spec.engine import EngineSpec, Limits
from leanvlm.spec.manifest import MANIFEST_NAME, config_hash, load_engine_spec


# ---- backend interface and registry ---------------------------------------------------------------
def test_registered_backends_implement_the_interface():
    assert {"onnxruntime", "torch"} <= set(backend_names())
    for name in backend_names():
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves abstract methods"


def test_unknown_backend_option_is_refused(engines):
    spec = load_engine_spec(engines(0.33).out)
    with pytest.raises(UserError, match=r"backend 'onnxruntime': unknown option\(s\) device; it takes: providers, threads"):
        make_backend(spec, "onnxruntime", device="cuda")
    with pytest.raises(UserError, match="unknown option"):
        Pipeline.load(engines(0.33).out, backend="torch", providers=["CPUExecutionProvider"])


def test_a_registered_backend_is_usable_by_name(engines, monkeypatch):
    class Recording(backend_class("onnxruntime")):
        """The ONNX Runtime backend, counting decode steps: a third-party backend in a few lines."""

        name = "recording"
        steps = 0

        def decode(self, *args):
            Recording.steps += 1
            return super().decode(*args)

    from leanvlm.runtime.backends import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # registered for this test only
    register_backend("recording", Recording)
    res = Pipeline.load(engines(0.33).out, backend="recording").generate(
        image=images(1)[0], prompt="Hi", max_new_tokens=5, ignore_eos=True)
    assert len(res.token_ids) == 5 and Recording.steps == 4


def test_cli_backend_choices_come_from_the_registry():
    from leanvlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("generate", "eval", "viz", "bench"):
        backend = next(a for a in sub.choices[command]._actions if a.dest == "backend")
        assert tuple(backend.choices) == backend_names()


def test_onnxruntime_runtime_does_not_import_torch(engines, tmp_path):
    """A service or a Jetson running ONNX Runtime engines needs no torch: load, generate, check it never came in."""
    path = tmp_path / "x.png"
    images(1)[0].save(path)
    code = (
        "import sys, json\n"
        "from leanvlm.runtime import Pipeline\n"
        f"res = Pipeline.load({str(engines(0.33).out)!r}).generate(image={str(path)!r}, prompt='Hi', max_new_tokens=4)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'tokens': res.token_ids}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tokens"] and report["torch"] is False


# ---- typed engine spec and schema policy ----------------------------------------------------------
def test_spec_from_manifest_equals_spec_built_from_config(engines, hf_model):
    result = engines(0.33, method="pdrop")
    spec = load_engine_spec(result.out)
    built = EngineSpec.build(hf_model.config, Schedule.preset("pdrop", 4, 64, 0.33, vision_layers=1),
                             Limits(8, 64 + 512, 256))
    assert spec.model == built.model and spec.limits == built.limits and spec.cache_groups == built.cache_groups
    assert spec.schedule == built.schedule and spec.precision.name == "fp32"
    assert spec.graph_path("prefill") == result.out / "prefill.onnx"
    assert result.manifest["artifacts"]["onnxruntime"]["graphs"]["decode"] == "decode.onnx"
    assert [g.decode_position_offset for g in spec.cache_groups] == [0, 64 - 44, 64 - 30, 64 - 21]


def _rewrite(engine_dir, edit):
    path = engine_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_schema_accepts_additive_minor_versions(engine_copy):
    def future_minor(d):
        d["schema_version"] = "1.9"
        d["a_field_from_the_future"] = {"x": 1}
        d["model"]["another_new_field"] = 3
    _rewrite(engine_copy, future_minor)
    assert Pipeline.load(engine_copy).generate(image=images(1)[0], prompt="Hi", max_new_tokens=2).token_ids


def test_schema_reads_version_1_engines_with_defaults(engine_copy):
    """Engines of leanvlm 0.1 wrote schema_version 1 with no precision, artifacts or decode offsets."""
    def old(d):
        d["schema_version"] = 1
        for key in ("precision", "artifacts"):
            d.pop(key)
        for g in d["cache_groups"]:
            g.pop("decode_position_offset")
        d["schedule"].pop("decode_positions")
    _rewrite(engine_copy, old)
    spec = load_engine_spec(engine_copy)
    assert spec.precision.name == "fp32" and spec.schedule.decode_positions == "prompt"
    assert spec.graph_path("vision") == engine_copy / "vision.onnx"


@pytest.mark.parametrize("version", [2, "2.0", "one", None])
def test_schema_refuses_other_majors(engine_copy, version):
    _rewrite(engine_copy, lambda d: d.update(schema_version=version))
    with pytest.raises(EngineError, match="schema version .* is not supported"):
        load_engine_spec(engine_copy)


def test_malformed_manifest_section_is_named(engine_copy):
    _rewrite(engine_copy, lambda d: d["limits"].pop("max_batch"))
    with pytest.raises(EngineError, match="section 'limits' is malformed"):
        load_engine_spec(engine_copy)


def test_config_hash_ignores_dtype(hf_model):
    import torch

    cfg = hf_model.config.to_dict()
    half = {**cfg, "dtype": "float16", "text_config": {**cfg["text_config"], "dtype": torch.float16}}
    assert config_hash(half) == config_hash(cfg)
    assert config_hash({**cfg, "vision_feature_layer": -1}) != config_hash(cfg)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_backend_runs_in_half_precision(engines, dtype):
    """The source checkpoint is found by its dtype-free config hash and run in the asked dtype."""
    import torch

    pipe = Pipeline.load(engines(0.33).out, backend="torch", dtype=dtype, device="cpu")
    assert pipe.backend.dtype == getattr(torch, dtype)
    res = pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=4, ignore_eos=True)
    assert len(res.token_ids) == 4 and len(res.kept[0]) == 21


# ---- in-memory Pipeline ---------------------------------------------------------------------------
def test_pipeline_from_model_equals_the_exported_engine(engines, hf_model, processor):
    """The schedule search scores candidates without exporting: same tokens and kept indices as the engine."""
    schedule = Schedule.preset("pdrop", 4, 64, 0.33, vision_layers=1)
    mem = Pipeline.from_model(hf_model, processor, schedule, device="cpu")
    eng = Pipeline.load(engines(0.33, method="pdrop").out)
    imgs = images(3)
    a = mem.generate(images=imgs, prompts=PROMPTS, max_new_tokens=12, ignore_eos=True)
    b = eng.generate(images=imgs, prompts=PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.kept for r in a] == [r.kept for r in b]
    assert mem.spec.directory is None and mem.manifest == {}


# ---- the torch-free processor against transformers' ------------------------------------------------
@pytest.mark.parametrize("size", [(40, 40), (40, 72), (90, 31), (3, 3)])
def test_processor_matches_transformers(engines, processor, size):
    from PIL import Image

    pipe = Pipeline.load(engines(1.0).out)
    rng = np.random.default_rng(sum(size))
    imgs = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["Hi", PROMPTS[1]]
    ours = pipe.preprocess(imgs, prompts)
    hf = processor(images=imgs, text=[chat(processor, p) for p in prompts], return_tensors="np", padding=True)
    np.testing.assert_allclose(ours.pixel_values, hf["pixel_values"], atol=1e-6, rtol=0)
    assert ours.input_ids.tolist() == hf["input_ids"].tolist()
    assert ours.attention_mask.tolist() == hf["attention_mask"].tolist()


def test_shipped_model_processor_matches_transformers():
    from transformers import AutoProcessor

    from leanvlm.models.loading import SHIPPED_DIR
    from leanvlm.runtime.processor import VLMProcessor

    directory = SHIPPED_DIR / "shapes-llava"
    ours, hf = VLMProcessor.load(directory), AutoProcessor.from_pretrained(directory)
    img = images(1, size=96)[0]
    text = chat(hf, "Which is further left, the yellow triangle or the red circle? Answer with one word.")
    assert chat(ours, text.split("\n", 1)[1].rsplit(" ASSISTANT:", 1)[0]) == text
    hf_out = hf(images=[img], text=[text], return_tensors="np")
    assert ours.token_ids(text, 144) == hf_out["input_ids"][0].tolist()
    np.testing.assert_allclose(ours.pixel_values([img]), hf_out["pixel_values"], atol=1e-6, rtol=0)


# ---- precision plumbing ---------------------------------------------------------------------------
def test_unknown_precision_is_refused_before_anything_is_written(tmp_path, tiny_dir):
    from leanvlm.cli import export_engine_main

    with pytest.raises(SystemExit) as e:
        export_engine_main(["--model", str(tiny_dir), "--keep", "0.5", "--precision", "fp8", "--out",
                            str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    from leanvlm.export import ExportOptions, export_engine

    with pytest.raises(UserError, match="--precision fp7: choose one of"):
        export_engine(ExportOptions(model=str(tiny_dir), keep=0.5, out=tmp_path / "y", precision="fp7"))
    assert not (tmp_path / "y").exists()


def test_kv_cache_and_inputs_take_the_spec_dtype(engines):
    pipe = Pipeline.load(engines(0.33).out)
    batch = pipe.preprocess(images(1), ["Hi"])
    assert batch.pixel_values.dtype == np.dtype(pipe.spec.precision.io_dtype)
    res = pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=3, ignore_eos=True)
    per_entry = 2 * pipe.spec.model.num_kv_heads * pipe.spec.model.head_dim * pipe.spec.precision.itemsize
    assert res.kv_cache["used_bytes"] == per_entry * sum(
        res.kv_cache["lengths"][g.index] * len(g.layers) for g in pipe.spec.cache_groups)


def test_tolerance_and_shape_failures_are_distinct_errors(engines, hf_model):
    from leanvlm.errors import ShapeMismatchError, ToleranceError
    from leanvlm.export.verify import check_engine, load_sessions
    from leanvlm.reference import ReducedLlava
    from leanvlm.spec.precision import PRECISIONS

    sessions = load_sessions(engines(0.33).out)
    strict = replace(PRECISIONS["fp32"], logits_atol=1e-12, kv_atol=1e-12)
    with pytest.raises(ToleranceError, match="logits max \\|diff\\|"):
        check_engine(ReducedLlava(hf_model, Schedule.fastv(4, 64, 0.33)), sessions, [5, 9], precision=strict)
    with pytest.raises(ShapeMismatchError, match="kept_indices.0: shape \\[2, 21\\], reference \\[2, 32\\]"):
        check_engine(ReducedLlava(hf_model, Schedule.fastv(4, 64, 0.5)), sessions, [5, 9])
