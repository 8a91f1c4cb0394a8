"""Reduced-precision engines: fp16 graphs with their fp32 islands, int8 Q/DQ, int4 MatMulNBits, bf16 refusal on
this onnxruntime build; each checked against the fp32 reference, and on the trained model by accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import PROMPTS, images
from leanvlm import Pipeline
from leanvlm.cli import export_engine_main, main
from leanvlm.spec.names import is_reduction_node

GRAPHS = ("vision", "embed", "prefill", "decode")


def _types(path) -> dict[str, int]:
    """Element type of every value in a graph (shape inference over the graph alone: weights stay on disk)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def test_fp16_graphs_keep_their_fragile_parts_in_fp32(engines):
    result = engines(0.33, method="pdrop", precision="fp16")
    m = result.manifest
    assert m["precision"]["name"] == "fp16" and m["precision"]["io_dtype"] == "float16"
    io = {g: {v["name"]: v["dtype"] for v in [*m["graphs"][g]["inputs"], *m["graphs"][g]["outputs"]]}
          for g in GRAPHS}
    assert io["vision"]["pixel_values"] == io["prefill"]["inputs_embeds"] == io["decode"]["past_key_values.0.key"] \
        == io["prefill"]["present.3.value"] == "float16"
    assert io["prefill"]["logits"] == io["decode"]["logits"] == "float32"
    f32 = onnx.TensorProto.FLOAT
    for g in ("vision", "prefill", "decode"):
        model = onnx.load(str(result.out / f"{g}.onnx"), load_external_data=False)
        types = _types(result.out / f"{g}.onnx")
        softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax and all(types[n.input[0]] == f32 for n in softmax), g  # every softmax in fp32
        norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "ReduceMean")]
        assert norms and all(types[n.input[0]] == f32 for n in norms), g  # norm reductions in fp32
    prefill = onnx.load(str(result.out / "prefill.onnx"), load_external_data=False)
    types = _types(result.out / "prefill.onnx")
    topk = [n for n in prefill.graph.node if n.op_type == "TopK" and is_reduction_node(n.name)]
    assert len(topk) == 6 and all(types[n.input[0]] == f32 for n in topk)  # scores feeding TopK: fp32
    assert all(c.graph and c.kept_overlap >= 0.9 for c in result.checks)
    assert (result.out / "weights.onnx.data").stat().st_size < 0.55 * engines(0.33, method="pdrop").weights_file_bytes


def test_fp16_engine_runs_and_passes_parity(capsys, engines):
    out = engines(0.33, precision="fp16").out
    half = Pipeline.load(out)
    full = Pipeline.load(engines(0.33).out)
    imgs = images(3)
    a = half.generate(images=imgs, prompts=PROMPTS, max_new_tokens=8, ignore_eos=True)
    b = full.generate(images=imgs, prompts=PROMPTS, max_new_tokens=8, ignore_eos=True)
    # a random model has near-tied scores, so fp16 may keep another token in some row; where it keeps the same
    # ones, it generates the same tokens
    same_kept = [r.kept == s.kept for r, s in zip(a, b)]
    assert sum(same_kept) >= 2
    assert all(r.token_ids == s.token_ids for r, s, k in zip(a, b, same_kept) if k)
    assert a[0].kv_cache["used_bytes"] * 2 == b[0].kv_cache["used_bytes"]  # the cache is fp16
    # low-memory sessions (fp16 weights cast per node instead of fp32 copies) compute the same graph
    lean = Pipeline.load(out, low_memory=True).generate(images=imgs, prompts=PROMPTS, max_new_tokens=8,
                                                          ignore_eos=True)
    assert [r.token_ids for r in lean] == [r.token_ids for r in a] and [r.kept for r in lean] == [r.kept for r in a]
    assert main(["parity", str(out), "--samples", "2", "--steps", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and report["passed"] and report["kept_overlap"] >= 0.9
    assert 0 < report["logits_max_abs"] <= report["atol"]


def test_int8_is_qdq_with_the_reduction_path_in_float(engines):
    result = engines(0.33, method="pdrop", precision="int8", calib_data="shapes", calib_n=16)
    out = result.out
    for g in ("vision", "prefill", "decode"):
        model = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        produced_by = {o: n for n in model.graph.node for o in n.output}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        quantized = [n for n in matmuls if all(produced_by.get(i) is not None
                                              and produced_by[i].op_type == "DequantizeLinear" for i in n.input)]
        assert quantized, g  # weight MatMuls run on Q/DQ pairs
        for n in matmuls:
            if is_reduction_node(n.name) or n in quantized:
                continue
            # what stays float: the reduction path and the attention products (activation x activation)
            assert not any(produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear"
                           for i in n.input)
        assert not [n for n in model.graph.node if is_reduction_node(n.name) and "Quantize" in n.op_type]
    weights = {g: {i.name: {e.key: e.value for e in i.external_data}
                   for i in onnx.load(str(out / f"{g}.onnx"), load_external_data=False).graph.initializer
                   if i.data_type == onnx.TensorProto.INT8 and i.external_data} for g in ("prefill", "decode")}
    shared = set(weights["prefill"]) & set(weights["decode"])
    assert shared and all(weights["prefill"][n] == weights["decode"][n] for n in shared)  # one int8 copy
    assert result.manifest["export"]["calibration"] == {"data": "shapes", "n": 16, "activations": "asymmetric"}
    res = Pipeline.load(out).generate(image=images(1)[0], prompt="Hi", max_new_tokens=4, ignore_eos=True)
    assert len(res.token_ids) == 4


def test_int4_quantizes_decoder_matmuls_only(engines):
    result = engines(0.33, precision="int4")
    ops = {g: [n.op_type for n in onnx.load(str(result.out / f"{g}.onnx"), load_external_data=False).graph.node]
           for g in GRAPHS}
    assert "MatMulNBits" in ops["prefill"] and "MatMulNBits" in ops["decode"]
    assert "MatMulNBits" not in ops["vision"]
    assert any("MatMulNBits" in issue and "custom domain" in issue for issue in result.lint)  # not for TensorRT
    res = Pipeline.load(result.out).generate(image=images(1)[0], prompt="Hi", max_new_tokens=4, ignore_eos=True)
    assert len(res.token_ids) == 4


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--precision int8 needs --calib-data"),
    (["--precision", "int4", "--calib-data", "shapes"], "--calib-data is used by --precision int8 only"),
    (["--precision", "int8", "--calib-data", "{tmp}/nope.jsonl"], "--calib-data .*nope.jsonl: no such file"),
    (["--precision", "int8", "--calib-data", "{tmp}/bad.jsonl"], "--calib-data .*bad.jsonl, line 2: not valid JSON"),
    (["--precision", "int8", "--calib-data", "shapes", "--calib-n", "0"], "--calib-n 0: must be a positive"),
    (["--precision", "bf16"], "--precision bf16: the exported graphs could not be verified here: onnxruntime .* "
                              "has no bfloat16 MatMul kernel"),
])
def test_bad_precision_input_exit_2_nothing_written(capsys, tmp_path, tiny_dir, args, message):
    img = tmp_path / "x.png"
    images(1)[0].save(img)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "x.png", "question": "Hi", "answers": ["a"]})
                                        + "\n{not json\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    import re

    assert export_engine_main(["--model", str(tiny_dir), "--keep", "0.5", "--out", str(tmp_path / "o"), *args]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def shapes_engines(tmp_path_factory):
    from leanvlm.export import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("shapes-precision")
    made = {}

    def get(precision):
        if precision not in made:
            calib = {"calib_data": "shapes", "calib_n": 64} if precision == "int8" else {}
            made[precision] = export_engine(ExportOptions(model="shapes-llava", keep=0.33, out=root / precision,
                                                          max_batch=32, precision=precision, **calib))
        return made[precision]
    return get


# FastV keep 0.33 on these 96 questions: fp32, fp16 and int8 91.7% (int8: every answer token-identical to
# fp32's), int4 90.6% (96.9% identical); benchmarks/precision-shapes.json has the 500-question figures. The bars
# leave one answer of margin.
@pytest.mark.parametrize("precision, bar, agreement", [("fp16", 0.906, 0.98), ("int8", 0.906, 0.95),
                                                       ("int4", 0.896, 0.93)])
def test_trained_model_accuracy_per_precision(shapes_engines, precision, bar, agreement):
    from leanvlm.eval.harness import evaluate, shapes_items

    items = shapes_items(96)
    report = evaluate(Pipeline.load(shapes_engines(precision).out), items, 32)
    base = evaluate(Pipeline.load(shapes_engines("fp32").out), items, 32)
    assert report.accuracy >= bar, f"{precision}: {report.accuracy:.3f}"
    agree = np.mean([p["tokens"] == q["tokens"] for p, q in zip(report.predictions, base.predictions)])
    assert agree >= agreement, f"{precision}: {agree:.3f} of the answers equal fp32's"
