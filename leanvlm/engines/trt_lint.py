"""TensorRT-compatibility lint of ONNX graphs, runnable where TensorRT is absent.

Rules are what TensorRT 10.3's ONNX parser accepts (onnx-tensorrt docs/operators.md): opsets 9-20,
an operator allowlist, TopK with a constant K <= 3840 on float input, CumSum on float input with a
constant axis, and no data-dependent-shape operators such as NonZero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_OPSET = 20
TOPK_MAX_K = 3840
FLOAT_TYPES = {1, 10, 16}  # FLOAT, FLOAT16, BFLOAT16
# Operators our graphs may emit that TensorRT 10.3 parses (the subset of its matrix relevant to transformers).
ALLOWED_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Conv Cos CumSum Div Einsum Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual Identity If LayerNormalization Less
LessOrEqual Log LogSoftmax MatMul Max Min Mul Neg Not Or Pad Pow Range ReduceMax ReduceMean ReduceMin ReduceSum
ReduceSumSquare Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Sin Slice Softmax Split Sqrt Squeeze Sub Sum
Tanh Tile TopK Transpose Unsqueeze Where Xor Gelu Reciprocal Mod IsNaN IsInf QuantizeLinear DequantizeLinear
""".split())


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


def lint_onnx(path: str | Path, max_opset: int = MAX_OPSET, topk_max_k: int = TOPK_MAX_K) -> list[LintIssue]:
    """Everything in the graph at `path` that TensorRT 10.3 would reject; empty when it should parse. Issues
    name nodes by their exported names: the reduction path's are stable (`/model/layers.2/reduce/TopK`)."""
    import onnx

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
        issues.append(LintIssue(g, "", "opset", f"opset {opset} > {max_opset}, the newest TensorRT 10.3 parses"))
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
        if node.op_type not in ALLOWED_OPS:
            issues.append(LintIssue(g, node.name, node.op_type, "operator not in the TensorRT 10.3 allowlist"))
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
