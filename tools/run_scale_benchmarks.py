#!/usr/bin/env python3
"""Reproduce benchmarks/scale-7b.json: export and load cost of LLaVA-1.5-7B-shaped models (CLIP ViT-L/14-336 with
all 24 layers, Llama width 4096, MLP 11008, vocab 32064) with 2 and 4 decoder layers, fp32 and fp16, and the
prefill time per decoder layer at 646 tokens, FastV keep 0.33 vs unreduced. The README extrapolates these to
the real 7B and 13B. FastV acts at layer 1 here (a 2-layer model has no layer 2).

    python tools/run_scale_benchmarks.py [--layers 2 4] [--precisions fp32 fp16] [--work /tmp/leanvlm-scale]

Checkpoints are made with `leanvlm make-tiny --preset llava-7b-shape --layers N --dtype float16` (real
checkpoints are stored in fp16). Every export and every engine load runs in its own process. Memory is sampled
in that process as proportional set size (leanvlm.runtime.bench.MemorySampler), split into anonymous memory
(what memory pressure cannot take back) and file-backed pages (the mapped checkpoint or weights file: clean,
dropped and re-read by the kernel under pressure); PSS counts a file mapped by two sessions once, where RSS
(and VmHWM, also recorded) counts it twice. Everything includes the interpreter and libraries, which
`baseline` (the runtime's imports, no model) measures alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.spec.precision import get_precision  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

BIN = Path(sys.executable).parent


def run_measured(cmd: list[str]) -> tuple[float, str]:
    """Run a command; (wall seconds, stdout). Children report their own peak RSS (VmHWM)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


EXPORT = """
import json, sys
from leanvlm.cli import export_engine_main
from leanvlm.runtime.bench import MemorySampler, peak_rss_bytes
with MemorySampler() as mem:
    code = export_engine_main(sys.argv[1:])
print(json.dumps({"code": code, "peak": mem.peak, "vmhwm": peak_rss_bytes()}))
sys.exit(code)
"""


BASELINE = """
import json, sys
from leanvlm.runtime import Pipeline
import onnxruntime
from transformers import PreTrainedTokenizerFast
from leanvlm.runtime.bench import memory_now
print(json.dumps(memory_now()))
"""

LOAD = """
import json, sys, time
from pathlib import Path
from leanvlm.runtime.bench import MemorySampler, bench_pipeline, peak_rss_bytes
t0 = time.perf_counter()
with MemorySampler() as load:
    from leanvlm.runtime import Pipeline
    pipe = Pipeline.load(sys.argv[1], low_memory=sys.argv[2] == "low_memory")
load_s = time.perf_counter() - t0
with MemorySampler() as run:
    r = bench_pipeline(pipe, batch=1, prompt_len=70, new_tokens=4, repeats=3, warmup=1)
print(json.dumps({"load_s": load_s, "load_peak": load.peak, "run_peak": run.peak, "vmhwm": peak_rss_bytes(),
                  "prefill_s": r["prefill_s"]["median"], "vision_s": r["vision_s"]["median"],
                  "prompt_tokens": r["prompt_tokens"], "decode_tokens_per_s": r["decode_tokens_per_s"]["median"]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-scale"))
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of these layers x precisions in the committed scale-7b.json")
    args = ap.parse_args()
    work = fresh_workdir(args.work)
    env_python = str(sys.executable)
    _, out = run_measured([env_python, "-c", BASELINE])
    baseline = json.loads(out.strip().splitlines()[-1])
    rows = []
    for layers in args.layers:
        ckpt = work / f"7b-shape-{layers}l"
        wall, _ = run_measured([str(BIN / "leanvlm"), "make-tiny", str(ckpt), "--preset", "llava-7b-shape",
                                   "--layers", str(layers), "--dtype", "float16"])
        ckpt_bytes = (ckpt / "model.safetensors").stat().st_size
        print(f"checkpoint {layers} layers: {ckpt_bytes / 2**30:.2f} GiB fp16 ({wall:.0f} s)", flush=True)
        for precision in args.precisions:
            for label, keep in (("unreduced", "1"), ("fastv", "0.33")):
                out_dir = work / f"{layers}l-{precision}-{label}"
                # FastV at layer 1 (layer 2 does not exist in a 2-layer model): layers 1..N-1 see 190 tokens
                wall, out = run_measured([env_python, "-c", EXPORT, "--model", str(ckpt), "--keep", keep,
                                          "--layer", "1", "--precision", precision, "--out", str(out_dir),
                                          "--max-batch", "4"])
                export = json.loads(out.strip().splitlines()[-1])
                weights = (out_dir / "weights.onnx.data").stat().st_size
                disk = sum(p.stat().st_size for p in out_dir.iterdir())
                # fp16 on the CPU provider: low-memory sessions, or ONNX Runtime holds fp32 copies of the weights
                mode = "low_memory" if get_precision(precision).half else "default"
                _, out = run_measured([env_python, "-c", LOAD, str(out_dir), mode])
                load = json.loads(out.strip().splitlines()[-1])
                row = {"decoder_layers": layers, "precision": precision, "schedule": label, "keep": float(keep),
                       "checkpoint_bytes": ckpt_bytes, "export_s": round(wall, 1),
                       "export_peak": export["peak"], "export_vmhwm_bytes": export["vmhwm"],
                       "weights_bytes": weights, "engine_disk_bytes": disk,
                       "engine_load_peak": load["load_peak"], "engine_run_peak": load["run_peak"],
                       "engine_vmhwm_bytes": load["vmhwm"], "engine_sessions": mode,
                       "engine_load_s": round(load["load_s"], 2), "prompt_tokens": load["prompt_tokens"],
                       "vision_ms": 1e3 * load["vision_s"], "prefill_ms": 1e3 * load["prefill_s"],
                       "decode_tokens_per_s": load["decode_tokens_per_s"]}
                row["export_peak_over_weights"] = export["peak"]["total"] / weights
                row["export_anon_over_weights"] = export["peak"]["anon"] / weights
                row["engine_run_over_weights"] = load["run_peak"]["total"] / weights
                row["engine_run_anon_over_weights"] = load["run_peak"]["anon"] / weights
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python tools/run_scale_benchmarks.py " + " ".join(sys.argv[1:])
    path = ROOT / "benchmarks" / "scale-7b.json"
    if args.update and path.exists():  # keep the other rows; the file lists every command that made it
        old = json.loads(path.read_text())
        done = {(r["decoder_layers"], r["precision"]) for r in rows}
        rows = [r for r in old["rows"] if (r["decoder_layers"], r["precision"]) not in done] + rows
        rows.sort(key=lambda r: (r["decoder_layers"], r["precision"] != "fp32", r["schedule"] != "unreduced"))
        command = f"{old['command']}; then {command}"
    report = {"command": command, "machine": machine(),
              "model": "llava-7b-shape (make-tiny): CLIP ViT-L/14-336 24 layers (23 run), Llama 4096/11008/32 "
                       "heads, vocab 32064, random weights stored in fp16",
              "settings": {"backend": "onnxruntime CPU", "prompt": "576 image + ~70 text tokens", "batch": 1,
                           "export": "--max-batch 4, torchscript exporter, verification on 3 ragged prompts",
                           "engine_sessions": "fp16 engines opened with Pipeline.load(..., low_memory=True) "
                                              "(ONNX Runtime CPU has no fp16 GEMM)"},
              "baseline": baseline, "rows": rows}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
