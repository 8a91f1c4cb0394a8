#!/usr/bin/env python3
"""Reproduce benchmarks/precision-shapes.json and benchmarks/precision-cpu.json: what each precision costs in
accuracy and gains in size and CPU speed.

    python tools/run_precision_benchmarks.py [--part accuracy|speed|all] [--n 500] [--repeats 7]

accuracy: shapes-llava, 500 held-out questions, each precision x (unreduced, FastV keep 0.33, PyramidDrop keep
0.33): accuracy, greedy agreement with the fp32 engine of the same schedule, weights file size. fp32/fp16/
int8/int4 run as ONNX Runtime engines (int8 calibrated on 64 requests of the shapes task's training split);
bf16 runs on the torch backend on CPU, since ONNX Runtime's CPU build has no bf16 kernels (bf16 export is
refused there).

speed: the mid preset (576 image tokens, 8 layers of width 512), ONNX Runtime on this CPU, batch 1 and 8, 646
prompt tokens, 32 new tokens; each engine in its own process, processes interleaved round-robin, median of
--repeats calls per round. fp16 on CPU is for correctness only: ONNX Runtime's CPU kernels cast it to fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.eval.harness import evaluate, shapes_items  # noqa: E402
from leanvlm.export import ExportOptions, export_engine  # noqa: E402
from leanvlm.runtime import Pipeline  # noqa: E402
from leanvlm.runtime.bench import bench_engine  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
SCHEDULES = (("unreduced", "fastv", 1.0), ("fastv", "fastv", 0.33), ("pdrop", "pdrop", 0.33))
BATCH = 32


def export(model: str, out: Path, precision: str, method: str, keep: float, max_batch: int = BATCH):
    calib = {"calib_data": "shapes", "calib_n": 64} if precision == "int8" else {}
    t0 = time.perf_counter()
    result = export_engine(ExportOptions(model=model, keep=keep, method=method, out=out, max_batch=max_batch,
                                         precision=precision, force=True, **calib))
    return result, time.perf_counter() - t0


def accuracy(work: Path, n: int) -> dict:
    items = shapes_items(n)
    rows = []
    for label, method, keep in SCHEDULES:
        base_tokens = None
        for precision in (*ENGINE_PRECISIONS, "bf16"):
            t0 = time.perf_counter()
            if precision == "bf16":  # the fp32 engine's schedule, run by the torch reference in bfloat16
                pipe = Pipeline.load(work / f"fp32-{label}", backend="torch", dtype="bfloat16", device="cpu")
                size, export_s, runtime = None, None, "torch CPU bfloat16"
            else:
                result, export_s = export("shapes-llava", work / f"{precision}-{label}", precision, method, keep)
                pipe = Pipeline.load(result.out)
                size, runtime = result.weights_file_bytes, "onnxruntime CPU"
            report = evaluate(pipe, items, BATCH)
            tokens = [p["tokens"] for p in report.predictions]
            base_tokens = base_tokens or tokens
            agree = sum(a == b for a, b in zip(tokens, base_tokens)) / len(tokens)
            row = {"precision": precision, "schedule": label, "method": method, "keep": keep, "runtime": runtime,
                   "accuracy": report.accuracy, "greedy_agreement_with_fp32": agree, "weights_bytes": size,
                   "per_type": {k: v["accuracy"] for k, v in sorted(report.per_type.items())},
                   "export_s": export_s and round(export_s, 1), "eval_s": round(report.seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del pipe
    return {"command": f"python tools/run_precision_benchmarks.py --part accuracy --n {n}", "machine": machine(),
            "model": "shapes-llava (144 image tokens, 4 decoder layers)",
            "data": f"shapes task, test split, seed 0, first {n} samples; int8 calibration: 64 requests of the "
                    "train split (disjoint)",
            "settings": {"batch": BATCH, "decoding": "greedy, max 8 new tokens"}, "rows": rows}


def speed(work: Path, repeats: int, rounds: int) -> dict:
    from leanvlm.models import make_tiny

    ckpt = make_tiny(work / "mid", preset="mid")
    engines = {}
    for precision in ENGINE_PRECISIONS:
        for label, keep in (("unreduced", 1.0), ("fastv", 0.33)):
            result, export_s = export(str(ckpt), work / f"mid-{precision}-{label}", precision, "fastv", keep, 8)
            engines[f"{precision}-{label}"] = (result.out, result.weights_file_bytes, export_s)
            print(f"exported {precision}-{label} in {export_s:.1f} s", flush=True)
    runs: dict[str, list] = {}
    for batch in (1, 8):
        for r in range(rounds):  # round-robin: every engine sees the same machine state in turn
            for name, (out, _, _) in engines.items():
                res = bench_engine(out, batch=batch, prompt_len=70, new_tokens=32, repeats=repeats, warmup=1)
                runs.setdefault(f"{name}-b{batch}", []).append(res)
                print(f"batch {batch} round {r} {name}: prefill {res['prefill_s']['median'] * 1e3:.1f} ms, "
                      f"decode {res['decode_tokens_per_s']['median']:.1f} tok/s", flush=True)
    rows = []
    for key, results in runs.items():
        name, batch = key.rsplit("-b", 1)
        precision, label = name.split("-", 1)
        pre = sorted(x["prefill_s"]["median"] for x in results)
        dec = sorted(x["decode_tokens_per_s"]["median"] for x in results)
        rows.append({"precision": precision, "schedule": label, "batch": int(batch),
                     "prefill_ms": 1e3 * pre[len(pre) // 2], "decode_tokens_per_s": dec[len(dec) // 2],
                     "peak_rss_bytes": max(x["peak_rss_bytes"] for x in results),
                     "weights_bytes": engines[name][1], "export_s": round(engines[name][2], 1),
                     "rounds": [{"prefill_ms": 1e3 * x["prefill_s"]["median"],
                                 "decode_tokens_per_s": x["decode_tokens_per_s"]["median"]} for x in results]})
    for row in rows:
        base = next(r for r in rows if r["precision"] == "fp32" and r["schedule"] == row["schedule"]
                    and r["batch"] == row["batch"])
        row["prefill_speedup_vs_fp32"] = base["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup_vs_fp32"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return {"command": f"python tools/run_precision_benchmarks.py --part speed --repeats {repeats} --rounds {rounds}",
            "machine": machine(),
            "model": "mid preset (CLIP 336 px / 14: 576 image tokens, 4 ViT layers; Llama hidden 512, 8 layers, "
                     "vocab 32000), random weights",
            "settings": {"backend": "onnxruntime CPU", "prompt": "576 image + 70 text tokens", "new_tokens": 32,
                         "repeats_per_round": repeats, "rounds": rounds,
                         "int8_calibration": "64 shapes-task requests"},
            "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("accuracy", "speed", "all"), default="all")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-precision"))
    args = ap.parse_args()
    fresh_workdir(args.work)
    out = ROOT / "benchmarks"
    if args.part in ("accuracy", "all"):
        (out / "precision-shapes.json").write_text(json.dumps(accuracy(args.work, args.n), indent=2) + "\n")
    if args.part in ("speed", "all"):
        (out / "precision-cpu.json").write_text(json.dumps(speed(args.work, args.repeats, args.rounds), indent=2)
                                                + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
