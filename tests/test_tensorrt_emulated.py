"""leanvlm's TensorRT build and backend code, run against an emulation of TensorRT's Python API
(tests/trt_emulator.py: the ONNX graphs on ONNX Runtime behind engines, profiles, contexts and raw tensor
addresses). This checks leanvlm's side (staging and records, plan selection, one context per profile, shapes,
addresses, the KV cache written in place, index read-back); it says nothing about TensorRT itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import trt_emulator
from conftest import PROMPTS, images
from leanvlm import Pipeline
from leanvlm.cli import main
from leanvlm.engines import trt_build
from leanvlm.errors import EngineError, UserError
# adaptive needs trained ATP modules (tests/test_adaptive.py covers its export and lint)
from leanvlm.reduction.schedule import FIXED_METHODS as METHODS
from leanvlm.runtime.processor import VLMProcessor
from leanvlm.spec.manifest import MANIFEST_NAME, load_engine_spec, read_manifest


@pytest.fixture
def emulated(monkeypatch):
    """`import tensorrt` gets the emulator, this machine reports SM 8.7, builds write emulated plans."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt_emulator.module())
    monkeypatch.setattr(trt_build, "compute_capability", lambda device=0: ("8.7", "emulated Orin"))
    monkeypatch.setattr(trt_build, "_build_graph", trt_emulator.build_graph)
    trt_emulator.DESERIALIZED.clear()
    return trt_emulator


@pytest.fixture
def engine(engines, tmp_path, request):
    import shutil

    method = getattr(request, "param", "fastv")
    dst = tmp_path / f"engine-{method}"
    shutil.copytree(engines(0.33, method=method).out, dst)
    return dst


def _pipeline(out, **kw):
    spec = load_engine_spec(out)
    cls = trt_emulator.backend_class()
    return Pipeline(spec, cls(spec, **kw), VLMProcessor.load(out))


def test_build_records_plans_cache_and_checksums(emulated, engine, capsys):
    assert main(["build", str(engine), "--workspace", "1", "--max-batch", "2"]) == 0
    assert "plans for SM 8.7 (fp32)" in capsys.readouterr().out
    data = read_manifest(engine)  # verifies every checksum, the new plans' too
    record = data["artifacts"]["tensorrt"]["builds"]["sm87-trt10.3.0-fp32"]
    assert record["tensorrt"] == "10.3.0.30" and record["compute_capability"] == "8.7"
    assert record["workspace_bytes"] == 1 << 30 and record["limits"]["max_batch"] == 2
    assert set(record["graphs"]) == {"vision", "embed", "prefill", "decode"}
    assert len(record["profiles"]["embed"]) == 2 and record["build_seconds"]["total"] >= 0
    assert {f for f in data["files"] if f.startswith("trt/")} == {g["file"] for g in record["graphs"].values()}
    cache = engine / "trt" / "sm87-trt10.3.0-fp32.timing-cache"
    assert cache.read_bytes() == b"emulated cache+++"  # one cache, carried from graph to graph
    assert main(["build", str(engine)]) == 0  # a rebuild replaces the plans, reuses and extends the cache
    assert cache.read_bytes() == b"emulated cache+++++++"
    assert read_manifest(engine)["artifacts"]["tensorrt"]["builds"]["sm87-trt10.3.0-fp32"]["limits"]["max_batch"] > 2
    assert sorted(p.name for p in (engine / "trt").iterdir()) == ["sm87-trt10.3.0-fp32",
                                                                   "sm87-trt10.3.0-fp32.timing-cache"]


def test_failed_build_leaves_the_engine_as_it_was(emulated, engine, monkeypatch, capsys):
    before = {p.relative_to(engine): p.read_bytes() for p in engine.rglob("*") if p.is_file()}

    def fail_on_prefill(trt, gb, plan, cache):
        if gb.graph == "prefill":
            raise RuntimeError("out of memory")
        return emulated.build_graph(trt, gb, plan, cache)

    monkeypatch.setattr(trt_build, "_build_graph", fail_on_prefill)
    assert main(["build", str(engine)]) == 2
    assert "TensorRT failed to build prefill (RuntimeError: out of memory)" in capsys.readouterr().err
    assert {p.relative_to(engine): p.read_bytes() for p in engine.rglob("*") if p.is_file()} == before
    assert not (engine / "trt").exists()


def test_build_for_another_jetson_is_refused_on_this_device(emulated, engine, capsys):
    assert main(["build", str(engine), "--target", "jetson-thor-jp7"]) == 2
    assert "SM 11.0 with TensorRT 11.4; this machine is SM 8.7" in capsys.readouterr().err
    assert main(["build", str(engine), "--target", "jetson-orin-jp6"]) == 0  # 8.7 + 10.3: this is one


@pytest.mark.parametrize("engine", METHODS, indirect=True)
def test_backend_matches_onnxruntime_for_every_method(emulated, engine):
    assert main(["build", str(engine)]) == 0
    kw = dict(images=images(2), prompts=PROMPTS[1:], max_new_tokens=8, ignore_eos=True)
    trt = _pipeline(engine)
    got = trt.generate(**kw)
    want = Pipeline.load(engine).generate(**kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.kept for r in got] == [r.kept for r in want] and [r.merged for r in got] == [r.merged for r in want]
    assert len(emulated.DESERIALIZED) == 4  # one plan per graph
    cache_keys = [k for k in trt.backend.contexts]
    assert sorted(cache_keys) == [("decode", 0), ("embed", 0), ("embed", 1), ("prefill", 0), ("vision", 0)]


def test_backend_keeps_the_kv_cache_in_its_own_buffers(emulated, engine):
    """Decode reads the cache buffers by address: the runtime's tensors are what the graph sees."""
    assert main(["build", str(engine)]) == 0
    pipe = _pipeline(engine)
    be = pipe.backend
    seen = []
    orig = be._run

    def spy(graph, feed, phase="prefill"):
        if graph == "decode":
            seen.append(feed["past_key_values.0.key"])
        return orig(graph, feed, phase)

    be._run = spy
    pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=4, ignore_eos=True)
    import torch

    assert len(seen) == 3 and all(isinstance(t, torch.Tensor) for t in seen)
    assert len({t.data_ptr() for t in seen}) == 1  # the same buffer every step, written in place


def test_shapes_past_the_plans_profiles_are_refused(emulated, engine):
    n_img = load_engine_spec(engine).model.num_image_tokens
    assert main(["build", str(engine), "--max-batch", "1", "--max-prompt", str(n_img + 16)]) == 0
    pipe = _pipeline(engine)  # the engine itself takes batch 8 and 512 text tokens; these plans do not
    with pytest.raises(UserError, match=r"outside the TensorRT plan's profile .*rebuild with larger limits"):
        pipe.generate(images=images(2), prompts=PROMPTS[:2], max_new_tokens=4)
    with pytest.raises(UserError, match="input_ids of shape .* outside the TensorRT plan's profile"):
        pipe.generate(image=images(1)[0], prompt=PROMPTS[1] * 3, max_new_tokens=4)
    assert pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=8, ignore_eos=True).token_ids


def test_plans_of_another_device_are_refused_before_deserialization(emulated, engine):
    assert main(["build", str(engine)]) == 0
    cls = trt_emulator.backend_class()
    cls.capability = ("8.9", "emulated L4")
    spec = load_engine_spec(engine)
    with pytest.raises(EngineError, match="built for SM 8.7, this GPU is SM 8.9.*rebuild on this device"):
        cls(spec)
    emulated.__version__ = "10.4.0"
    try:
        cls.capability = ("8.7", "emulated Orin")
        with pytest.raises(EngineError, match="built with TensorRT 10.3.0.30, this machine has 10.4.0"):
            cls(spec)
    finally:
        emulated.__version__ = "10.3.0.30"
    assert emulated.DESERIALIZED == []


def test_pipeline_load_with_tensorrt_but_no_gpu_says_so(emulated, engine):
    assert main(["build", str(engine)]) == 0
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        Pipeline.load(engine, backend="tensorrt")


def test_a_tampered_plan_is_refused_by_the_manifest_check(emulated, engine):
    assert main(["build", str(engine)]) == 0
    plan = engine / "trt" / "sm87-trt10.3.0-fp32" / "decode.plan"
    plan.write_bytes(plan.read_bytes().replace(b"emulated", b"emulatex"))
    with pytest.raises(EngineError, match="decode.plan: sha256 mismatch"):
        _pipeline(engine)
    assert (engine / MANIFEST_NAME).is_file()
    np.testing.assert_equal(emulated.DESERIALIZED, [])
