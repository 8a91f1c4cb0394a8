#!/usr/bin/env python3
"""Reproduce benchmarks/gpu-precision.json: the torch backend (the PyTorch reference) on a CUDA GPU in float32,
float16 and bfloat16, unreduced vs FastV keep 0.33, for the mid preset and LLaVA-1.5-7B-shaped models.

    python tools/run_gpu_precision.py [--out benchmarks/gpu-precision.json] [--layers 32 4] [--repeats 5]

Models are built in memory with random weights (Hugging Face's initialisation, made on the GPU) and run through
`Pipeline.from_model`: no export, no download. Each row: batch 1, 576 image tokens + ~70 text tokens, 32 new
tokens, median of --repeats full generate() calls after 2 warm-up calls. float32 matmuls run in full fp32
(TF32 off), so the fp16/bf16 ratios are against true fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.models.tiny import build_llava  # noqa: E402
from leanvlm.reduction.schedule import Schedule  # noqa: E402
from leanvlm.runtime import Pipeline  # noqa: E402
from leanvlm.runtime.bench import bench_pipeline  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def model_rows(name: str, preset: str, layers: int | None, repeats: int) -> list[dict]:
    import torch

    from leanvlm.models.llava_config import num_image_tokens, vision_layers_used

    overrides = {"text_layers": layers} if layers else {}
    t0 = time.perf_counter()
    model, processor = build_llava(0, preset, random_spread=False, device="cuda", **overrides)
    built = time.perf_counter() - t0
    cfg = model.config
    n, vit = num_image_tokens(cfg), vision_layers_used(cfg)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for dtype in DTYPES:
        model = model.to(getattr(torch, dtype))
        for method, keep in (("unreduced", 1.0), ("fastv", 0.33)):
            schedule = Schedule.preset("fastv", cfg.text_config.num_hidden_layers, n, keep, 2, vit)
            pipe = Pipeline.from_model(model, processor, schedule, device="cuda", dtype=dtype)
            r = bench_pipeline(pipe, batch=1, prompt_len=70, new_tokens=32, repeats=repeats, warmup=2)
            row = {"model": name, "decoder_layers": cfg.text_config.num_hidden_layers, "params": params,
                   "dtype": dtype, "method": method, "keep": keep, "prompt_tokens": r["prompt_tokens"],
                   "llm_image_tokens_after_stage": schedule.image_tokens_per_layer()[-1],
                   "vision_ms": 1e3 * r["vision_s"]["median"], "prefill_ms": 1e3 * r["prefill_s"]["median"],
                   "prefill_ms_p25_p75": [1e3 * r["prefill_s"]["p25"], 1e3 * r["prefill_s"]["p75"]],
                   "ttft_ms": 1e3 * r["ttft_s"]["median"],
                   "decode_tokens_per_s": r["decode_tokens_per_s"]["median"],
                   "theoretical_prefill_flops_ratio": r["theoretical_prefill_flops_ratio"],
                   "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del pipe
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"# {name}: built in {built:.1f} s", flush=True)
    return rows


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu-precision.json")
    ap.add_argument("--layers", type=int, nargs="*", default=[32, 4], help="decoder layers of the 7B-shaped models")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; this benchmark measures the torch backend on a GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = model_rows("mid", "mid", None, args.repeats)
    for layers in args.layers:
        rows += model_rows(f"llava-7b-shape-{layers}l", "llava-7b-shape", layers, args.repeats)
    import transformers

    report = {"command": "python tools/run_gpu_precision.py " + " ".join(sys.argv[1:]),
              "machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "cuda": torch.version.cuda, "transformers": transformers.__version__,
                          "python": platform.python_version()},
              "settings": {"backend": "torch (leanvlm reference, eager, SDPA attention)", "batch": 1,
                           "text_tokens": "~70", "new_tokens": 32, "repeats": args.repeats, "warmup": 2,
                           "tf32": False, "fastv_layer": 2},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
