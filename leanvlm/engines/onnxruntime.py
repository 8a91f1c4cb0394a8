"""ONNX Runtime sessions over exported graphs."""

from __future__ import annotations

import os
from pathlib import Path


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def create_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                   spin: bool | None = None, prepack: bool | None = None, low_memory: bool = False):
    """An InferenceSession with full graph optimisation (unless `low_memory`); `threads` caps intra-op threads
    (default: all cores).

    Intra-op spinning is off by default: a pipeline runs four sessions one after another, and a session
    that just finished keeps its pool spinning, taking the cores from the next one. Measured on the
    2-core benchmark machine: prefill 210 -> 136 ms with FastV, 330 -> 269 ms unreduced.
    LEANVLM_ORT_SPIN=1 turns it back on.

    Weight prepacking (`prepack`, default off): float engines keep their weights once, in the engine's
    shared memory-mapped weights file, where a CPU MatMul that prepacks would keep a packed copy per session
    (prefill and decode would hold two); quantized engines need it (their kernels run on the packed form).
    The backend passes the engine precision's choice; LEANVLM_ORT_PREPACK=0|1 overrides both.

    `low_memory` (half-precision graphs on the CPU provider): ONNX Runtime has no x86 fp16 GEMM and runs a half
    graph's MatMuls in fp32; its graph optimisations (FuseInitializersTransformer, constant folding) turn every
    fp16 weight into a resident fp32 copy at session creation, 2x the weights. Without optimisation and without
    the memory arena, the inserted Casts run per node and their outputs are freed at once: memory stays near the
    mapped weights; slower per run (decode ~5x), the same graph semantics.
    Measured on a 4-layer LLaVA-7B-shaped fp16 prefill graph (1.75 GiB of weights): 3.78 -> 1.52 GiB anonymous
    peak; with 2 layers 1.25 GiB (0.14 GiB per layer instead of 0.75).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_DISABLE_ALL if low_memory else level.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if spin is None:
        spin = os.environ.get("LEANVLM_ORT_SPIN", "0") == "1"
    if os.environ.get("LEANVLM_ORT_PREPACK") in ("0", "1"):
        prepack = os.environ["LEANVLM_ORT_PREPACK"] == "1"
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    if low_memory:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = threads
    elif os.environ.get("LEANVLM_ORT_THREADS"):
        opts.intra_op_num_threads = int(os.environ["LEANVLM_ORT_THREADS"])
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or default_providers())


def unsupported_dtype(dtype: str, providers: list[str] | None = None) -> str | None:
    """Why this onnxruntime build cannot run graphs whose activations are `dtype` (float16, bfloat16), or
    None when it can: a one-MatMul graph is opened with the providers that would run the engine."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from leanvlm.spec import defaults

    if dtype == "float32":
        return None
    elem = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    x = helper.make_tensor_value_info("x", elem, [2, 2])
    y = helper.make_tensor_value_info("y", elem, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"]), ], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", defaults.OPSET)])
    providers = providers or default_providers()
    try:
        ort.InferenceSession(model.SerializeToString(), providers=providers)
    except Exception as e:  # NOT_IMPLEMENTED: no kernel for that type on these providers
        return (f"onnxruntime {ort.__version__} with {', '.join(providers)} has no {dtype} MatMul kernel "
                f"({str(e).splitlines()[0][:120]})")
    return None
