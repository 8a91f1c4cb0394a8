#!/usr/bin/env python3
"""Reproduce benchmarks/presets-cpu.json: vision-encoder and prefill latency of every preset at keep 0.33 and
0.125 on the mid config, against the unreduced engine, next to each theoretical FLOPs ratio.

    python tools/run_preset_benchmarks.py [--work /tmp/leanvlm-presets] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.export import ExportOptions, export_engine  # noqa: E402
from leanvlm.export.engine import resolve_schedule  # noqa: E402
from leanvlm.spec import defaults  # noqa: E402
from leanvlm.models import make_tiny  # noqa: E402
from leanvlm.reduction.plan import make_plan  # noqa: E402
from leanvlm.runtime.bench import bench_engine  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

METHODS = ("fastv", "pdrop", "illava", "visionzip")
TEXT_TOKENS = 70


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-presets"))
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    from transformers import LlavaConfig

    fresh_workdir(args.work)
    mid = make_tiny(args.work / "mid", preset="mid")
    cfg = LlavaConfig.from_pretrained(mid)
    kw = dict(batch=1, prompt_len=TEXT_TOKENS, new_tokens=4, repeats=args.repeats, warmup=3)
    engines = {"full": (1.0, "fastv")} | {f"{m}-{k}": (k, m) for k in (0.33, 0.125) for m in METHODS}
    rows = {}
    for name, (keep, method) in engines.items():
        print(f"export + bench {name}", flush=True)
        out = args.work / name
        export_engine(ExportOptions(model=str(mid), keep=keep, method=method, out=out, max_batch=1, force=True))
        run = bench_engine(out, **kw)
        plan = make_plan(cfg, resolve_schedule(cfg, method, keep, defaults.FASTV_LAYER, None), TEXT_TOKENS)
        rows[name] = {"method": method, "keep": keep, "llm_image_tokens": run["image_tokens"],
                      "vision_ms": run["vision_s"]["median"] * 1e3, "prefill_ms": run["prefill_s"]["median"] * 1e3,
                      "ttft_ms": run["ttft_s"]["median"] * 1e3, "theoretical_vision_flops_ratio": plan.vision_flops_ratio,
                      "theoretical_prefill_flops_ratio": plan.prefill_flops_ratio, "run": run}
    base = rows["full"]
    for r in rows.values():
        r["vision_speedup"] = base["vision_ms"] / r["vision_ms"]
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
    report = {"command": "python tools/run_preset_benchmarks.py", "machine": machine(),
              "config": "mid preset (576 image tokens, 8 decoder layers, 3 ViT layers up to the feature layer); "
                        "onnxruntime CPU, batch 1, 70 text tokens; keep = fraction of the image tokens that reach "
                        "the last stage", "settings": kw, "rows": rows}
    (ROOT / "benchmarks" / "presets-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, r in rows.items():
        print(f"{name:16s} vision {r['vision_ms']:7.1f} ms ({r['vision_speedup']:.2f}x, ideal "
              f"{1 / r['theoretical_vision_flops_ratio']:.2f}x)  prefill {r['prefill_ms']:7.1f} ms "
              f"({r['prefill_speedup']:.2f}x, ideal {1 / r['theoretical_prefill_flops_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
