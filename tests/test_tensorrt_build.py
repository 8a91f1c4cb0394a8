"""The TensorRT flow where TensorRT is absent: profiles from the manifest, trtexec commands, the target table,
build records and their refusals, the Jetson bundle and its build script, the per-release lint. The builds and
runs themselves are the `tensorrt`-marked tests at the end (skipped here, with the reason)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import PROMPTS, images
from leanvlm.cli import main
from leanvlm.engines import trt_build, trt_profiles
from leanvlm.engines.jetson_bundle import make_bundle
from leanvlm.engines.trt_lint import lint_onnx
from leanvlm.engines.trt_targets import (ARCHS, JETSON_TARGETS, PARSER_10_3, PARSER_11, device_target, get_target,
                                         parser_rules, plan_dir_name)
from leanvlm.errors import EngineError, UserError
# adaptive needs trained ATP modules (tests/test_adaptive.py covers its export and lint)
from leanvlm.reduction.schedule import FIXED_METHODS as METHODS
from leanvlm.spec import names
from leanvlm.spec.manifest import load_engine_spec, read_manifest, sha256_file

ORIN = JETSON_TARGETS["jetson-orin-jp6"]
THOR = JETSON_TARGETS["jetson-thor-jp7"]


# ---- profiles ---------------------------------------------------------------------------------------------
def _within(shape, prof) -> bool:
    lo, _, hi = prof
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt_batch", [1, 2])
def test_profiles_cover_every_dynamic_input_within_the_engine_limits(engines, method, opt_batch):
    spec = load_engine_spec(engines(0.33, method=method).out)
    lim = trt_profiles.profile_limits(spec, opt_batch=opt_batch)
    profiles = trt_profiles.graph_profiles(spec, lim)
    n_img, L = spec.model.num_image_tokens, spec.limits
    assert [len(profiles[g]) for g in names.GRAPH_NAMES] == [1, 2, 1, 1]
    for g in names.GRAPH_NAMES:
        dynamic = {i["name"] for i in spec.graphs[g]["inputs"] if not all(isinstance(d, int) for d in i["shape"])}
        for prof in profiles[g]:
            assert set(prof) == dynamic, g
            for name, (lo, opt, hi) in prof.items():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (g, name)
                assert (lo[0], opt[0], hi[0]) == (1, opt_batch, L.max_batch), (g, name)  # batch axis
    pre = profiles["prefill"][0][names.INPUTS_EMBEDS]
    assert [s[1] for s in pre] == [n_img + 1, min(L.max_prompt, n_img + 64), L.max_prompt]
    assert [s[2] for s in pre] == [spec.model.hidden_size] * 3
    emb_pre, emb_dec = profiles["embed"]
    assert [s[1] for s in emb_pre[names.IMAGE_FEATURES]] == [n_img] * 3
    assert [s[1:] for s in emb_dec[names.IMAGE_FEATURES]] == [(0, spec.model.hidden_size)] * 3
    assert [s[1] for s in emb_dec[names.INPUT_IDS]] == [1, 1, 1]
    dec = profiles["decode"][0]
    for grp in spec.cache_groups:
        past = dec[names.kv_name("past_key_values", grp.layers.start, "key")]
        mask = dec[names.decode_mask_name(grp.index)]
        assert past[2][2] == grp.capacity  # the largest cache the runtime may allocate for this group
        assert [m[1] for m in mask] == [p[2] + 1 for p in past]
        assert past[0][1:] == (spec.model.num_kv_heads, past[0][2], spec.model.head_dim)


def test_profiles_hold_every_shape_the_runtime_feeds(engines):
    """Run real requests through the ONNX Runtime backend and check each graph input against its profile."""
    from leanvlm import Pipeline

    out = engines(0.33, method="pdrop").out
    pipe = Pipeline.load(out)
    spec = pipe.spec
    profiles = trt_profiles.graph_profiles(spec, trt_profiles.profile_limits(spec))
    seen = []
    be = pipe.backend
    orig = {k: getattr(be, k) for k in ("vision", "embed", "prefill", "decode")}

    def vision(pv):
        seen.append(("vision", 0, {names.PIXEL_VALUES: pv.shape}))
        return orig["vision"](pv)

    def embed(ids, feats):
        seen.append(("embed", trt_profiles.profile_for("embed", "decode" if feats.shape[1] == 0 else "prefill"),
                     {names.INPUT_IDS: ids.shape, names.IMAGE_FEATURES: feats.shape}))
        return orig["embed"](ids, feats)

    def prefill(e, m, p, s):
        seen.append(("prefill", 0, {names.INPUTS_EMBEDS: e.shape, names.ATTENTION_MASK: m.shape,
                                    names.POSITION_IDS: p.shape, names.IMAGE_START: s.shape}))
        return orig["prefill"](e, m, p, s)

    def decode(e, p, masks, past):
        shapes = {names.INPUTS_EMBEDS: e.shape, names.POSITION_IDS: p.shape}
        shapes.update({names.decode_mask_name(g): m.shape for g, m in enumerate(masks)})
        for i, (k, v) in enumerate(past):
            shapes[names.kv_name("past_key_values", i, "key")] = k.shape
            shapes[names.kv_name("past_key_values", i, "value")] = v.shape
        seen.append(("decode", 0, shapes))
        return orig["decode"](e, p, masks, past)

    be.vision, be.embed, be.prefill, be.decode = vision, embed, prefill, decode
    pipe.generate(images=images(3), prompts=PROMPTS, max_new_tokens=5, ignore_eos=True)
    pipe.generate(image=images(1)[0], prompt="Hi", max_new_tokens=spec.limits.max_new_tokens, ignore_eos=True)
    assert {(g, p) for g, p, _ in seen} == {("vision", 0), ("embed", 0), ("embed", 1), ("prefill", 0), ("decode", 0)}
    for graph, p, shapes in seen:
        for name, shape in shapes.items():
            assert _within(tuple(shape), profiles[graph][p][name]), (graph, name, shape, profiles[graph][p][name])


def test_tight_build_limits_shrink_profiles_and_refuse_looser_ones(engines):
    spec = load_engine_spec(engines(0.33, method="pdrop").out)
    lim = trt_profiles.profile_limits(spec, max_batch=1, max_prompt=100, max_new_tokens=16, opt_prompt=80)
    dec = trt_profiles.graph_profiles(spec, lim)["decode"][0]
    n_img = spec.model.num_image_tokens
    for grp in spec.cache_groups:
        past = dec[names.kv_name("past_key_values", grp.layers.start, "key")]
        dropped = n_img - grp.image_tokens
        assert past[2][0] == 1 and past[2][2] == 100 - dropped + 16
        assert past[1][2] == 80 - dropped + 16
    for kw, flag in ((dict(max_batch=spec.limits.max_batch + 1), "--max-batch"),
                     (dict(max_prompt=n_img), "--max-prompt"), (dict(max_new_tokens=0), "--max-new-tokens"),
                     (dict(opt_batch=2, max_batch=1), "--opt-batch"), (dict(opt_prompt=10_000), "--opt-prompt")):
        with pytest.raises(UserError, match=flag):
            trt_profiles.profile_limits(spec, **kw)


def test_unknown_dimension_is_an_error_naming_it(engines):
    from dataclasses import replace

    spec = load_engine_spec(engines(0.33).out)
    graphs = json.loads(json.dumps(spec.graphs))
    graphs["vision"]["inputs"][0]["shape"][2] = "height"
    with pytest.raises(EngineError, match="'height'"):
        trt_profiles.graph_profiles(replace(spec, graphs=graphs), trt_profiles.profile_limits(spec))


# ---- trtexec ------------------------------------------------------------------------------------------------
def test_trtexec_commands_match_the_profiles(engines):
    spec = load_engine_spec(engines(0.33, method="pdrop").out)
    plan = trt_build.plan_build(spec, ORIN, workspace_gib=1.5, builder_level=4, max_batch=2)
    lines = trt_build.trtexec_commands(plan)
    assert lines[0] == f"mkdir -p {spec.directory / 'trt' / 'sm87-trt10.3.0-fp32'}"
    cmds = {Path(next(a for a in shlex.split(line) if a.startswith("--onnx=")).split("=", 1)[1]).stem: shlex.split(line)
            for line in lines[1:]}
    assert sorted(cmds) == sorted(names.GRAPH_NAMES)
    for graph, argv in cmds.items():
        assert argv[0] == "trtexec"
        assert f"--saveEngine={spec.directory}/trt/sm87-trt10.3.0-fp32/{graph}.plan" in argv
        for flag in ("--stronglyTyped", "--skipInference", "--memPoolSize=workspace:1536M",
                     "--builderOptimizationLevel=4", f"--timingCacheFile={plan.timing_cache}"):
            assert flag in argv
        profiles = next(g.profiles for g in plan.graphs if g.graph == graph)
        mins = [a.split("=", 1)[1] for a in argv if a.startswith("--minShapes=")]
        maxs = [a.split("=", 1)[1] for a in argv if a.startswith("--maxShapes=")]
        assert len(mins) == len(maxs) == len(profiles)
        for spec_text, prof in zip(maxs, profiles):
            pairs = (kv.rsplit(":", 1) for kv in spec_text.split(","))
            parsed = {k: tuple(int(d) for d in v.split("x")) for k, v in pairs}
            assert parsed == {k: v[2] for k, v in prof.items()}
    assert [a for a in cmds["embed"] if a.startswith("--profile=")] == ["--profile=0", "--profile=1"]
    assert not any(a.startswith("--profile=") for a in cmds["decode"])
    assert "--maxShapes=pixel_values:2x3x32x32" in cmds["vision"]


def test_print_trtexec_without_a_gpu_names_the_device_by_variables(engines, capsys):
    out = engines(0.33).out
    assert main(["build", str(out), "--print-trtexec", "--opt-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert ': "${SM:?set SM}"' in text and "trt/sm${SM}-trt${TRT_VERSION}-fp32/prefill.plan" in text
    assert not (out / "trt").exists()  # printing builds nothing


# ---- targets ------------------------------------------------------------------------------------------------
def test_target_table_refuses_what_the_gpu_cannot_run():
    assert ORIN.precisions() == ["fp32", "fp16", "bf16", "int8"] == THOR.precisions()
    assert "fp8" not in ARCHS["8.7"].types and {"fp8", "fp4"} <= set(ARCHS["11.0"].types)
    with pytest.raises(UserError, match=r"jetson-orin-jp6: precision int4 .*MatMulNBits.* builds fp32, fp16, bf16, "
                                        r"int8"):
        ORIN.check_precision("int4")
    turing = device_target("10.3.0.30", "7.5", "T4")
    with pytest.raises(UserError, match=r"SM 7.5 .* no bf16 .*builds fp32, fp16, int8"):
        turing.check_precision("bf16")
    with pytest.raises(UserError, match="compute capability 6.1"):
        device_target("10.3.0", "6.1", "GTX 1080")
    with pytest.raises(UserError, match="--target jetson-nano"):
        get_target("jetson-nano")
    assert get_target("trt") is None
    assert (ORIN.sm, ORIN.tensorrt, ORIN.cuda, THOR.sm, THOR.tensorrt, THOR.cuda) == (
        "8.7", "10.3", "12.6", "11.0", "11.4", "13.0")
    assert parser_rules("10.3.0.30") is PARSER_10_3 and parser_rules("11.4.1") is PARSER_11
    assert parser_rules("10.15.1") is PARSER_11
    assert plan_dir_name("8.7", "10.3.0.30", "fp16") == "sm87-trt10.3.0-fp16"


def test_build_refuses_bad_input_before_touching_tensorrt(engines):
    spec = load_engine_spec(engines(0.33).out)
    with pytest.raises(UserError, match="--precision fp16: this engine's graphs are fp32"):
        trt_build.plan_build(spec, ORIN, precision="fp16")
    with pytest.raises(UserError, match="--builder-level 6"):
        trt_build.plan_build(spec, ORIN, builder_level=6)
    with pytest.raises(UserError, match="--workspace 0"):
        trt_build.plan_build(spec, ORIN, workspace_gib=0)
    int8 = load_engine_spec(engines(0.33, method="pdrop", precision="int8", calib_data="shapes", calib_n=16).out)
    with pytest.raises(UserError, match="--int8-activations symmetric"):
        trt_build.plan_build(int8, ORIN)
    int4 = load_engine_spec(engines(0.33, precision="int4").out)
    with pytest.raises(UserError, match="int4"):
        trt_build.plan_build(int4, ORIN)


def test_build_without_tensorrt_says_how_to_get_it_and_writes_nothing(engine_copy, capsys):
    before = sorted(p.relative_to(engine_copy) for p in engine_copy.rglob("*"))
    assert main(["build", str(engine_copy)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    spec = load_engine_spec(engine_copy)
    plan = trt_build.plan_build(spec, ORIN)
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trt_build.run_build(plan)
    assert sorted(p.relative_to(engine_copy) for p in engine_copy.rglob("*")) == before


@pytest.mark.parametrize("argv", [
    ["--target", "nope"], ["--builder-level", "7"], ["--workspace", "-2"], ["--workspace", "lots"],
    ["--max-batch", "99"], ["--opt-prompt", "1"], ["--precision", "bf16"], ["--max-new-tokens", "0"],
])
def test_build_cli_bad_input_exits_2(engines, argv, capsys):
    assert _exit_code(["build", str(engines(0.33).out), "--print-trtexec", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(("error:", "leanvlm build: error:")) and len(err.strip().splitlines()) == 1


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


# ---- build records ------------------------------------------------------------------------------------------
def _fake_record(engine_dir: Path, sm="8.7", trt="10.3.0.30", precision="fp32") -> dict:
    """Record a build whose plan files are placeholders (no TensorRT here to make real ones)."""
    name = plan_dir_name(sm, trt, precision)
    d = engine_dir / "trt" / name
    d.mkdir(parents=True)
    graphs = {}
    for g in names.GRAPH_NAMES:
        (d / f"{g}.plan").write_bytes(f"not a real plan: {g}".encode())
        graphs[g] = {"file": f"trt/{name}/{g}.plan", "sha256": sha256_file(d / f"{g}.plan"), "bytes": 20}
    record = {"dir": f"trt/{name}", "tensorrt": trt, "compute_capability": sm, "precision": precision,
              "graphs": graphs, "profiles": {}, "limits": {}}
    trt_build.add_build_record(engine_dir, record)
    return record


def test_build_record_joins_the_manifest_and_its_checksums(engine_copy):
    _fake_record(engine_copy)
    data = read_manifest(engine_copy)  # every checksum verifies, the plans' included
    assert set(data["artifacts"]["tensorrt"]["builds"]) == {"sm87-trt10.3.0-fp32"}
    assert "trt/sm87-trt10.3.0-fp32/prefill.plan" in data["files"]
    assert data["artifacts"]["onnxruntime"]  # the other backends' artifacts stay
    _fake_record(engine_copy, sm="9.0", trt="10.13.0")
    assert set(read_manifest(engine_copy)["artifacts"]["tensorrt"]["builds"]) == {"sm87-trt10.3.0-fp32",
                                                                                  "sm90-trt10.13.0-fp32"}
    (engine_copy / "trt/sm87-trt10.3.0-fp32/decode.plan").write_bytes(b"tampered")
    with pytest.raises(EngineError, match="decode.plan: sha256 mismatch"):
        read_manifest(engine_copy)


def test_plans_for_another_gpu_or_tensorrt_are_refused_with_rebuild_advice(engine_copy):
    _fake_record(engine_copy)
    spec = load_engine_spec(engine_copy)
    assert trt_build.select_build(spec, device_target("10.3.0.30", "8.7"))["dir"] == "trt/sm87-trt10.3.0-fp32"
    assert trt_build.select_build(spec, device_target("10.3.0.26", "8.7"))  # another build number: same release
    for device, why in ((device_target("10.3.0", "8.9"), "built for SM 8.7, this GPU is SM 8.9"),
                        (device_target("10.4.0", "8.7"), "built with TensorRT 10.3.0.30, this machine has 10.4.0"),
                        (device_target("11.4.0", "11.0"), "SM 8.7.*TensorRT 10.3.0.30")):
        with pytest.raises(EngineError, match=f"{why}.*rebuild on this device: leanvlm build {engine_copy} "
                                              "--target trt"):
            trt_build.select_build(spec, device)


def test_engine_without_plans_names_the_build_command(engines):
    spec = load_engine_spec(engines(0.33).out)
    with pytest.raises(EngineError, match="no TensorRT plans; build them on this device: leanvlm build"):
        trt_build.select_build(spec, device_target("10.3.0", "8.7"))


def test_tensorrt_backend_is_registered_and_refuses_clearly_without_tensorrt(engine_copy, capsys):
    from leanvlm import Pipeline
    from leanvlm.runtime.backends import backend_available, backend_names

    assert "tensorrt" in backend_names() and not backend_available("tensorrt")
    _fake_record(engine_copy)
    with pytest.raises(UserError, match="TensorRT is not installed"):
        Pipeline.load(engine_copy, backend="tensorrt")
    img = engine_copy.parent / "x.png"
    images(1)[0].save(img)
    assert main(["generate", str(engine_copy), "--backend", "tensorrt", "--image", str(img), "--prompt", "hi"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


# ---- Jetson bundle ------------------------------------------------------------------------------------------
@pytest.fixture
def bundle(engine_copy, tmp_path):
    _fake_record(engine_copy)  # another device's plans: they must stay behind
    out = tmp_path / "orin.tar.gz"
    res = make_bundle(engine_copy, ORIN, out, max_batch=1, max_prompt=120, max_new_tokens=32)
    root = tmp_path / "x"
    with tarfile.open(out) as tar:
        tar.extractall(root, filter="data")
    return res, root / f"{engine_copy.name}-jetson-orin-jp6", engine_copy


def test_bundle_holds_the_graphs_tokenizer_script_and_checksums(bundle):
    res, root, engine = bundle
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for f in ("build.sh", "README-device.md", "requirements-device.txt", "bundle.json", "SHA256SUMS",
              "engine/leanvlm.json", "engine/tokenizer.json", "engine/weights.onnx.data",
              "python/leanvlm/cli.py", "python/leanvlm/engines/trt_build.py",
              *[f"engine/{g}.onnx" for g in names.GRAPH_NAMES]):
        assert f in files, f
    assert not any(f.startswith("engine/trt/") or f.endswith((".plan", ".safetensors", ".pyc")) for f in files)
    sums = dict(reversed(line.split("  ", 1)) for line in (root / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == files - {"SHA256SUMS"} and sums == res.files
    assert all(sha256_file(root / f) == d for f, d in sums.items())
    assert os.access(root / "build.sh", os.X_OK)
    spec = load_engine_spec(root / "engine")  # the bundled engine verifies on its own, without other devices' plans
    assert "tensorrt" not in spec.artifacts
    info = json.loads((root / "bundle.json").read_text())
    assert info["target"]["name"] == "jetson-orin-jp6" and info["limits"]["max_batch"] == 1
    assert info["limits"]["max_prompt"] == 120 and info["workspace_gib"] == ORIN.workspace_gib
    assert "--max-batch" in info["build_command"] and any("--memPoolSize=workspace:1024M" in c for c in info["trtexec"])
    reqs = (root / "requirements-device.txt").read_text()
    assert "numpy==1.26.4" in reqs and "onnxruntime-gpu==" in reqs and "\ntorch" not in reqs
    est = res.estimate
    assert est["plan_weight_bytes"] > 0 and est["kv_cache_bytes"] > 0
    assert "Fits the smallest jetson-orin-jp6 module (8 GB)" in (root / "README-device.md").read_text()


def test_memory_estimate_counts_the_decoder_twice_and_the_kv_cache(engines):
    from leanvlm.engines.jetson_bundle import fits, memory_estimate

    spec = load_engine_spec(engines(0.33).out)
    gb = 1 << 30
    big = {"export": {"graph_weight_bytes": {"vision": gb // 2, "embed": gb // 4, "prefill": 3 * gb, "decode": 3 * gb}}}
    est = memory_estimate(spec, big, 1, 600, 64, 1.0)
    m = spec.model
    kv = sum(2 * len(g.layers) * m.num_kv_heads * m.head_dim * 4 * (600 - (m.num_image_tokens - g.image_tokens) + 64)
             for g in spec.cache_groups)
    assert est["kv_cache_bytes"] == kv and est["total_bytes"] == 6.75 * gb + kv + gb
    assert not fits(est, ORIN) and fits(est, THOR)


def _run_script(root: Path, *args):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(root)}
    return subprocess.run(["bash", str(root / "build.sh"), *args], cwd=root.parent, env=env, capture_output=True,
                          text=True, timeout=120)


def test_bundle_build_script_dry_run_detects_missing_tensorrt(bundle):
    _, root, _ = bundle
    assert shutil.which("trtexec") is None
    r = _run_script(root, "--dry-run")
    assert r.returncode == 5, r.stderr
    assert "TensorRT not found on this machine" in r.stderr and "nvidia-jetpack" in r.stderr
    (root / "engine" / "tokenizer.json").write_text("{}")
    r = _run_script(root, "--dry-run")
    assert r.returncode == 3 and "do not match SHA256SUMS" in r.stderr
    assert _run_script(root, "--now").returncode == 2


def test_bundle_build_script_picks_trtexec_when_only_it_is_there(bundle, tmp_path):
    _, root, _ = bundle
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "trtexec").write_text("#!/bin/sh\necho trtexec \"$@\"\n")
    (fake_bin / "trtexec").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    r = subprocess.run(["bash", str(root / "build.sh"), "--dry-run"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "building with" in r.stdout and "--saveEngine=$ENGINE/trt/sm87-trt10.3.0-fp32/decode.plan" in r.stdout


def test_bundle_cli_refuses_bad_input(engine_copy, tmp_path, capsys):
    base = ["bundle", str(engine_copy)]
    assert _exit_code([*base, "--target", "trt", "--out", str(tmp_path / "a.tar.gz")]) == 2
    assert main([*base, "--target", "jetson-orin-jp6", "--out", str(tmp_path / "a.zip")]) == 2
    assert main([*base, "--target", "jetson-orin-jp6", "--out", str(tmp_path / "no" / "a.tar.gz")]) == 2
    assert main([*base, "--target", "jetson-orin-jp6", "--out", str(tmp_path / "a.tar.gz"), "--workspace", "9"]) == 2
    assert main([*base, "--target", "jetson-orin-jp6", "--out", str(tmp_path / "a.tar.gz"), "--max-batch", "99"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trt' (choose from 'jetson-orin-jp6', 'jetson-thor-jp7')" in err
    assert "name a .tar.gz" in err and "--workspace 9" in err
    assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".bundle-*"))
    out = tmp_path / "a.tar.gz"
    assert main([*base, "--target", "jetson-thor-jp7", "--out", str(out)]) == 0
    assert main([*base, "--target", "jetson-thor-jp7", "--out", str(out)]) == 2  # exists
    assert main([*base, "--target", "jetson-thor-jp7", "--out", str(out), "--force"]) == 0


# ---- lint per parser release --------------------------------------------------------------------------------
def _qdq_model(path: Path, zp_type: int, zp_value: int = 0, consumer: str = "DequantizeLinear",
               q_name: str = "/model/layers.0/mlp/q", opset: int = 19):
    from onnx import TensorProto, helper, numpy_helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    np_zp = np.array(zp_value, dtype=np.uint8 if zp_type == TensorProto.UINT8 else np.int8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np_zp, "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name=q_name)]
    if consumer == "DequantizeLinear":
        nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="/model/layers.0/mlp/dq"))
    else:
        nodes.append(helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT, name="/model/layers.0/mlp/cast"))
    save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                           opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_lint_checks_int8_qdq_placement_by_stable_names(tmp_path):
    from onnx import TensorProto

    assert lint_onnx(_qdq_model(tmp_path / "ok.onnx", TensorProto.INT8)) == []
    asym = [str(i) for i in lint_onnx(_qdq_model(tmp_path / "u8.onnx", TensorProto.UINT8, 128))]
    assert len(asym) == 2 and all("uint8 zero point" in m and "--int8-activations symmetric" in m for m in asym)
    nonzero = [str(i) for i in lint_onnx(_qdq_model(tmp_path / "nz.onnx", TensorProto.INT8, 3))]
    assert nonzero and all("nonzero zero point" in m for m in nonzero)
    lone = [str(i) for i in lint_onnx(_qdq_model(tmp_path / "lone.onnx", TensorProto.INT8, consumer="Cast"))]
    assert lone == ["lone: QuantizeLinear '/model/layers.0/mlp/q': feeds Cast '/model/layers.0/mlp/cast'; TensorRT's "
                    "explicit quantization needs QuantizeLinear -> DequantizeLinear pairs"]
    reduce = [str(i) for i in lint_onnx(_qdq_model(tmp_path / "r.onnx", TensorProto.INT8,
                                                   q_name="/model/layers.2/reduce/QuantizeLinear"))]
    assert reduce == ["r: QuantizeLinear '/model/layers.2/reduce/QuantizeLinear': quantizes the reduction path "
                      "(token scores, TopK, merges), which must stay in float"]


def test_lint_rules_follow_the_tensorrt_release(tmp_path):
    from onnx import TensorProto

    path = _qdq_model(tmp_path / "o22.onnx", TensorProto.INT8, opset=22)
    assert [str(i) for i in lint_onnx(path)] == ["o22: opset '': opset 22 > 20, the newest TensorRT 10.3 parses"]
    assert lint_onnx(path, rules=PARSER_11) == []
    assert "RMSNormalization" in PARSER_11.ops and "RMSNormalization" not in PARSER_10_3.ops


@pytest.mark.parametrize("method", METHODS)
def test_every_method_passes_both_parser_releases_and_plans_for_orin(engines, method):
    """K of every TopK is a constant (iLLaVA's merges and VisionZip's contextual split once traced to Shape
    arithmetic and NonZero), so every preset can be built."""
    result = engines(0.33, method=method)
    assert result.manifest["export"]["trt_lint"] == []
    for rules in (PARSER_10_3, PARSER_11):
        assert [str(i) for g in names.GRAPH_NAMES for i in lint_onnx(result.out / f"{g}.onnx", rules=rules)] == []
    assert len(trt_build.plan_build(load_engine_spec(result.out), ORIN).graphs) == 4


def test_asymmetric_int8_engine_lint_names_its_qdq_nodes(engines):
    out = engines(0.33, method="pdrop", precision="int8", calib_data="shapes", calib_n=16).out
    issues = lint_onnx(out / "decode.onnx")
    assert issues and all(i.op in ("QuantizeLinear", "DequantizeLinear") for i in issues)
    assert any("uint8 zero point" in i.message and i.node.endswith("_QuantizeLinear") for i in issues)


# ---- on real TensorRT (skipped where it is absent) ----------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.parametrize("method", METHODS)
def test_tensorrt_build_and_run_match_onnxruntime(engines, tmp_path, method):
    from leanvlm import Pipeline

    src = engines(0.33, method=method).out
    out = tmp_path / "engine"
    shutil.copytree(src, out)
    spec = load_engine_spec(out)
    device = trt_build.detect_device()
    record = trt_build.run_build(trt_build.plan_build(spec, device, workspace_gib=1))
    assert (out / record["dir"] / "decode.plan").is_file()
    assert (out / "trt" / f"{Path(record['dir']).name}.timing-cache").is_file()
    imgs = images(3)
    a = Pipeline.load(out, backend="tensorrt").generate(images=imgs, prompts=PROMPTS, max_new_tokens=16,
                                                        ignore_eos=True)
    b = Pipeline.load(out).generate(images=imgs, prompts=PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [r.kept for r in a] == [r.kept for r in b]
    agree = np.mean([x == y for ra, rb in zip(a, b) for x, y in zip(ra.token_ids, rb.token_ids)])
    assert agree >= spec.precision.greedy_agreement
