#!/usr/bin/env python3
"""Reproduce benchmarks/*.json: export stats (tiny and mid) and runtime CPU benchmarks (mid, FastV K=2
keep 0.33 vs keep 1.0; onnxruntime and torch backends). Run on an otherwise idle machine:

    python tools/run_benchmarks.py [--work /tmp/leanvlm-bench] [--repeats 7]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.export import ExportOptions, export_engine  # noqa: E402
from leanvlm.models import make_tiny  # noqa: E402
from leanvlm.runtime.bench import bench_engine, compare  # noqa: E402


def machine() -> dict:
    import onnxruntime
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def fresh_workdir(work: Path) -> Path:
    """Quiet transformers' progress bars and start from an empty work directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def op_counts(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def export(model: str, keep: float, out: Path, **kw) -> dict:
    t = time.perf_counter()
    r = export_engine(ExportOptions(model=model, keep=keep, out=out, force=True, **kw))
    return {"model": model, "keep": keep, "seconds": round(time.perf_counter() - t, 2), "graph_bytes": r.graph_bytes,
            "max_abs_diff_vs_reference": r.manifest["export"]["check"],
            "prefill_ops": op_counts(out / "prefill.onnx"), "prefill_nodes": sum(op_counts(out / "prefill.onnx").values()),
            "theoretical_prefill_flops_ratio": r.flops_ratio}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-bench"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    work = fresh_workdir(args.work)
    tiny = make_tiny(work / "tiny")
    mid = make_tiny(work / "mid", preset="mid")

    exports = [export(str(tiny), 0.33, work / "tiny-fastv"), export(str(mid), 0.33, work / "mid-fastv", max_batch=4),
               export(str(mid), 1.0, work / "mid-full", max_batch=4)]
    (ROOT / "benchmarks" / "export.json").write_text(json.dumps(
        {"command": "python tools/run_benchmarks.py", "machine": machine(), "exports": exports}, indent=2) + "\n")

    kw = dict(batch=1, prompt_len=70, new_tokens=32, repeats=args.repeats, warmup=2)
    runs = {}
    for backend in ("onnxruntime", "torch"):
        for name in ("mid-fastv", "mid-full"):
            print(f"bench {name} {backend}", flush=True)
            runs[f"{name}/{backend}"] = bench_engine(work / name, backend=backend, **kw)
    report = {
        "command": "python tools/run_benchmarks.py",
        "machine": machine(),
        "config": "mid preset: CLIP 336px/14 (576 image tokens), Llama hidden 512, 8 layers, 8 heads, MLP 1376, "
                  "vocab 32000; FastV K=2 keep 0.33 (576 -> 190) vs keep 1.0; fp32",
        "settings": kw,
        "runs": runs,
        "comparisons": {
            "onnxruntime: fastv vs full": compare(runs["mid-fastv/onnxruntime"], runs["mid-full/onnxruntime"]),
            "torch: fastv vs full": compare(runs["mid-fastv/torch"], runs["mid-full/torch"]),
            "full: onnxruntime vs torch eager": compare(runs["mid-full/onnxruntime"], runs["mid-full/torch"]),
            "fastv: onnxruntime vs torch eager": compare(runs["mid-fastv/onnxruntime"], runs["mid-fastv/torch"]),
        },
    }
    (ROOT / "benchmarks" / "runtime-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    for k, v in report["comparisons"].items():
        print(k, {a: round(b, 3) for a, b in v.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
