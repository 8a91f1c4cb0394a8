"""ONNX Runtime sessions over exported graphs."""

from __future__ import annotations

import os
from pathlib import Path


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def create_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An InferenceSession with full graph optimisation; `threads` caps intra-op threads (default: all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    elif os.environ.get("LEANVLM_ORT_THREADS"):
        opts.intra_op_num_threads = int(os.environ["LEANVLM_ORT_THREADS"])
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or default_providers())
