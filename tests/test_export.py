"""Every exported graph against the PyTorch reference of the same schedule."""

import onnx
import pytest

from leanvlm.engines.trt_lint import lint_onnx, topk_ks
from leanvlm.export.verify import check_engine, load_sessions
from leanvlm.reduction.schedule import Schedule
from leanvlm.reference import ReducedLlava

GRAPHS = ("vision", "embed", "prefill", "decode")


@pytest.mark.parametrize("keep, layer", [(1.0, 2), (0.33, 2), (0.5, 1), (0.25, 3)])
@pytest.mark.parametrize("text_lens", [[7], [5, 12, 9]])
def test_graphs_match_reference(engines, hf_model, keep, layer, text_lens):
    result = engines(keep, layer)
    ref = ReducedLlava(hf_model, Schedule.fastv(4, 64, keep, layer))
    checks = {c.graph: c for c in check_engine(ref, load_sessions(result.out), text_lens, seed=7)}
    assert set(checks) == set(GRAPHS)
    assert checks["prefill"].max_abs["logits"] < 1e-4
    assert checks["decode"].max_abs["logits"] < 1e-4
    assert all(c.worst < 1e-4 and c.kept_equal for c in checks.values())
    # present KV lengths per layer follow the manifest's cache groups
    seq = max(text_lens) + 64
    for grp in result.manifest["cache_groups"]:
        a, b = grp["layers"]
        for i in range(a, b):
            assert checks["prefill"].shapes[f"present.{i}.key"][2] == seq - 64 + grp["image_tokens"]
            assert checks["decode"].shapes[f"present.{i}.key"][2] == 1
    if keep < 1:
        assert checks["prefill"].shapes["kept_indices.0"] == [len(text_lens), round(64 * keep)]


def test_reduced_graph_really_differs_from_unreduced(engines):
    """Guards against a schedule silently not being applied."""
    full, reduced = engines(1.0), engines(0.33)
    full_out = {o["name"]: o["shape"] for o in full.manifest["graphs"]["prefill"]["outputs"]}
    red_out = {o["name"]: o["shape"] for o in reduced.manifest["graphs"]["prefill"]["outputs"]}
    assert "kept_indices.0" in red_out and "kept_indices.0" not in full_out
    assert [g["image_tokens"] for g in reduced.manifest["cache_groups"]] == [64, 21]
    assert [g["image_tokens"] for g in full.manifest["cache_groups"]] == [64]


def test_graphs_pass_checker_and_tensorrt_lint_with_constant_topk(engines):
    result = engines(0.33)
    for g in GRAPHS:
        path = result.out / f"{g}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        assert lint_onnx(path) == [], g
        opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
        assert opset == 18
    assert topk_ks(result.out / "prefill.onnx") == [21, 21]
    for g in ("vision", "embed", "decode"):
        assert topk_ks(result.out / f"{g}.onnx") == []
    assert result.manifest["export"]["trt_lint"] == []


def test_lint_flags_dynamic_topk_and_new_opsets(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("v", TensorProto.FLOAT), ("i", TensorProto.INT64))]
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"]),
                               helper.make_node("NonZero", ["x"], ["nz"])], "g", [x, k], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(model, tmp_path / "bad.onnx")
    messages = [str(i) for i in lint_onnx(tmp_path / "bad.onnx")]
    assert any("opset 23" in m for m in messages)
    assert any("TopK" in m and "constant" in m for m in messages)
    assert any("NonZero" in m for m in messages)


def test_dynamo_exporter_matches_reference(engines, hf_model):
    result = engines(0.33, exporter="dynamo")
    ref = ReducedLlava(hf_model, Schedule.fastv(4, 64, 0.33, 2))
    checks = check_engine(ref, load_sessions(result.out), [6, 11, 3], seed=3)
    assert all(c.worst < 1e-4 and c.kept_equal for c in checks)
    assert topk_ks(result.out / "prefill.onnx") == [21, 21]
    dynamo_nodes = _reduction_nodes(result.out / "prefill.onnx")  # the same stable names from either exporter
    assert sorted(dynamo_nodes) == sorted(_reduction_nodes(engines(0.33).out / "prefill.onnx")) == [
        "/model/layers.2/reduce"]
    assert {"TopK", "Softmax"} <= set(dynamo_nodes["/model/layers.2/reduce"])


def _reduction_nodes(path) -> dict[str, list[str]]:
    """Stable-named reduction nodes of a graph: scope prefix -> sorted op types."""
    from leanvlm.spec.names import is_reduction_node

    out: dict[str, list[str]] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if is_reduction_node(n.name):
            out.setdefault(n.name.rsplit("/", 1)[0], []).append(n.op_type)
    return {k: sorted(set(v)) for k, v in out.items()}


@pytest.mark.parametrize("method, graph, scopes", [
    ("fastv", "prefill", ["/model/layers.2/reduce"]),
    ("pdrop", "prefill", ["/model/layers.1/reduce", "/model/layers.2/reduce", "/model/layers.3/reduce"]),
    ("illava", "prefill", ["/model/layers.1/reduce"]),
    ("illava", "vision", ["/vision/layers.0/reduce"]),
    ("visionzip", "vision", ["/vision/visionzip/reduce"]),
])
def test_reduction_path_has_stable_node_names(engines, method, graph, scopes):
    """Scoring, TopK, Gather and merges carry `/model/layers.{i}/reduce/...` names (ONNX Runtime GenAI's
    convention), so a quantiser can exclude them and TensorRT can pin them to fp32; nothing else does."""
    result = engines(0.33, method=method)
    nodes = _reduction_nodes(result.out / f"{graph}.onnx")
    assert sorted(nodes) == scopes
    for ops in nodes.values():
        assert {"TopK", "GatherElements"} <= set(ops)
    if method == "fastv":  # the score is the last token's softmax row of layer 1, in the stage's scope
        assert "Softmax" in nodes["/model/layers.2/reduce"]
    for other in ("vision", "embed", "prefill", "decode"):
        if other != graph and (method, other) not in {("illava", "prefill"), ("illava", "vision")}:
            assert _reduction_nodes(result.out / f"{other}.onnx") == {}


def test_lint_names_nodes_by_their_stable_names(engines):
    issues = lint_onnx(engines(0.33).out / "prefill.onnx", topk_max_k=8)  # as if K were limited to 8
    assert sorted(i.node for i in issues) == ["/model/layers.2/reduce/TopK", "/model/layers.2/reduce/TopK_1"]
    assert all("K > 8" in str(i) for i in issues)


def test_graphs_share_one_weights_file(engines):
    """Every tensor is stored once in weights.onnx.data; prefill and decode point at the same bytes."""
    result = engines(0.33)
    out = result.out
    assert sorted(p.name for p in out.iterdir() if "data" in p.name) == ["weights.onnx.data"]
    refs = {}
    for g in GRAPHS:
        model = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        refs[g] = {i.name: {e.key: e.value for e in i.external_data} for i in model.graph.initializer
                   if i.data_location == onnx.TensorProto.EXTERNAL}
        assert (out / f"{g}.onnx").stat().st_size < 200_000  # the graph alone: weights live outside
    decoder = {n for n in refs["prefill"] if ".layers." in n or "lm_head" in n}
    assert decoder and decoder <= set(refs["decode"])
    assert all(refs["prefill"][n] == refs["decode"][n] for n in decoder)
    spans = {(r["offset"], r["length"]) for g in GRAPHS for r in refs[g].values()}
    assert result.weights_file_bytes == (out / "weights.onnx.data").stat().st_size
    assert sum(int(n) for _, n in spans) <= result.weights_file_bytes < sum(int(n) for _, n in spans) + 4096 * len(spans)
    assert result.manifest["export"]["graph_weight_bytes"]["decode"] > 0.9 * result.manifest["export"]["graph_weight_bytes"]["prefill"]


def test_weights_past_2_gib_export_and_run(tmp_path):
    """A model whose weights cross protobuf's 2 GiB limit (3 decoder layers of LLaVA-7B's width, fp32):
    exported, verified against the reference, loaded and run."""
    from conftest import images
    from leanvlm import Pipeline
    from leanvlm.export import ExportOptions, export_engine
    from leanvlm.models import make_tiny

    ckpt = make_tiny(tmp_path / "wide", text_hidden=4096, text_intermediate=11008, text_layers=3, text_heads=32,
                     text_kv_heads=32)
    result = export_engine(ExportOptions(model=str(ckpt), keep=0.5, out=tmp_path / "engine", max_batch=2))
    assert result.weights_file_bytes > 2 * 2**30
    assert all(c.worst < 1e-3 and c.kept_equal for c in result.checks)
    res = Pipeline.load(result.out).generate(image=images(1)[0], prompt="Hi", max_new_tokens=3, ignore_eos=True)
    assert len(res.token_ids) == 3 and len(res.kept[0]) == 32


def test_export_frees_the_model_before_opening_sessions(tiny_dir, tmp_path, monkeypatch):
    """The sessions that check the graphs map the written weights; the PyTorch model must be gone by then,
    or export holds two copies of the weights (a graph spec left alive in export's frame once held it)."""
    import gc
    import weakref

    import leanvlm.models
    from leanvlm.export import ExportOptions, export_engine

    load = leanvlm.models.load_model
    models = []

    def tracked_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        models.append(weakref.ref(loaded.model))
        return loaded

    alive_at_check = []

    def on_step(msg: str) -> None:
        if msg.startswith("running graphs in ONNX Runtime"):
            gc.collect()
            alive_at_check.append(models[0]() is not None)

    monkeypatch.setattr(leanvlm.models, "load_model", tracked_load)
    export_engine(ExportOptions(model=str(tiny_dir), keep=0.5, out=tmp_path / "e"), on_step=on_step)
    assert alive_at_check == [False]
