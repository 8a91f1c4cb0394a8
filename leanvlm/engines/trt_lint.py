"""TensorRT-compatibility lint of ONNX graphs, runnable where TensorRT is absent.

Rules are per TensorRT release (engines/trt_targets.ParserRules: 10.3 on JetPack 6 parses opsets 9-20,
10.15 and 11.x opsets 9-24 and the fused LLM ops), after onnx-tensorrt's docs/operators.md: an operator
allowlist, TopK with a constant K <= 3840 on float input, CumSum on float input with a constant axis, no
data-dependent-shape operators such as NonZero, and explicit-quantization placement: every QuantizeLinear
feeds DequantizeLinear only, scales are constants, zero points are int8 zeros (TensorRT's GPU path is
symmetric), and no Q/DQ touches the reduction path (its scores and TopK must stay in float).
Issues name nodes by their exported names; the reduction path's are stable (`/model/layers.2/reduce/TopK`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leanvlm.engines.trt_targets import PARSER_10_3, ParserRules
from leanvlm.spec.names import is_reduction_node

MAX_OPSET = PARSER_10_3.max_opset
TOPK_MAX_K = PARSER_10_3.topk_max_k
FLOAT_TYPES = {1, 10, 16}  # FLOAT, FLOAT16, BFLOAT16
INT8, UINT8 = 3, 2
ALLOWED_OPS = PARSER_10_3.ops  # what TensorRT 10.3 parses (the subset of its matrix relevant to transformers)


# An adaptive stage's K (the batch's largest per-sample count) is computed in the graph. TensorRT 10.3's parser
# wants a constant K; where a TensorRT build takes K as a run-time tensor the TopK/Gather outputs and every
# tensor after them get data-dependent shapes, which need an IOutputAllocator per such output (sized at enqueue
# time, no preallocated I/O, no CUDA-graph capture of the prefill).
DYNAMIC_K = ("K is computed at run time (data-dependent shape): TensorRT needs a constant K, or output "
             "allocators for every data-dependent output; export adaptive stages with --static-cap (K = cap, "
             "masking only) for TensorRT")


@dataclass
class LintIssue:
    graph: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.op} {self.node!r}: {self.message}"


def lint_onnx(path: str | Path, max_opset: int | None = None, topk_max_k: int | None = None,
              rules: ParserRules | None = None) -> list[LintIssue]:
    """Everything in the graph at `path` that a TensorRT release's parser (`rules`, default 10.3) would reject;
    empty when it should parse. Issues name nodes by their exported names."""
    import onnx

    rules = rules or PARSER_10_3
    max_opset = rules.max_opset if max_opset is None else max_opset
    topk_max_k = rules.topk_max_k if topk_max_k is None else topk_max_k

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; type checks below then skip unknown tensors
        pass
    g = path.stem
    issues: list[LintIssue] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > max_opset:
        issues.append(LintIssue(g, "", "opset", f"opset {opset} > {max_opset}, the newest {rules.label} parses"))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    const_values = _constant_values(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            issues.append(LintIssue(g, node.name, node.op_type, f"custom domain {node.domain!r}"))
            continue
        if node.op_type not in rules.ops:
            issues.append(LintIssue(g, node.name, node.op_type, f"operator not in the {rules.label} allowlist"))
            continue
        if node.op_type == "TopK":
            k_name = node.input[1]
            if k_name not in constants:
                issues.append(LintIssue(g, node.name, "TopK", DYNAMIC_K))
            elif k_name in const_values and int(const_values[k_name].reshape(-1)[0]) > topk_max_k:
                issues.append(LintIssue(g, node.name, "TopK", f"K > {topk_max_k}"))
            if types.get(node.input[0], 1) not in FLOAT_TYPES:
                issues.append(LintIssue(g, node.name, "TopK", "input is not floating point"))
        if node.op_type == "CumSum":
            if node.input[1] not in constants:
                issues.append(LintIssue(g, node.name, "CumSum", "axis is not a constant"))
            if types.get(node.input[0], 1) not in FLOAT_TYPES:
                issues.append(LintIssue(g, node.name, "CumSum", "input is not floating point"))
    issues += _qdq_issues(model, g, rules, constants, const_values, types)
    return issues


def _qdq_issues(model, g: str, rules: ParserRules, constants: set, const_values: dict, types: dict) -> list[LintIssue]:
    """Explicit-quantization placement that TensorRT's strongly typed INT8 path rejects or runs wrongly."""
    issues = []
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 1 and node.input[1] not in constants:
            issues.append(LintIssue(g, node.name, node.op_type, "scale is computed at run time; TensorRT needs a "
                                    "constant"))
        if len(node.input) > 2 and node.input[2]:
            zp = node.input[2]
            zp_type = types.get(zp)
            if rules.int8_symmetric_only and zp_type == UINT8:
                issues.append(LintIssue(g, node.name, node.op_type, "uint8 zero point (asymmetric quantization); "
                                        "TensorRT takes symmetric int8: export with --int8-activations symmetric"))
            elif zp in const_values and const_values[zp].size and (const_values[zp] != 0).any():
                issues.append(LintIssue(g, node.name, node.op_type, "nonzero zero point; TensorRT quantization is "
                                        "symmetric"))
        if node.op_type == "QuantizeLinear":
            bad = [c for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                issues.append(LintIssue(g, node.name, node.op_type,
                                        f"feeds {bad[0].op_type} {bad[0].name!r}; TensorRT's explicit quantization "
                                        "needs QuantizeLinear -> DequantizeLinear pairs"))
        # An activation Q/DQ on the reduction path would make TensorRT run token scores in int8 (a weight's DQ
        # shared with a score projection only rounds that weight, as in ONNX Runtime).
        activation = node.input[0] not in constants
        if is_reduction_node(node.name) or (activation and any(
                is_reduction_node(c.name) for c in consumers.get(node.output[0], []))):
            issues.append(LintIssue(g, node.name, node.op_type, "quantizes the reduction path (token scores, TopK, "
                                    "merges), which must stay in float"))
    return issues


def _constant_values(model) -> dict:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if not i.data_location}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def topk_ks(path: str | Path) -> list[int]:
    """The constant K of every TopK node in a graph (for reports and tests)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = _constant_values(model)
    return [int(values[n.input[1]].reshape(-1)[0]) for n in model.graph.node if n.op_type == "TopK"]
