#!/usr/bin/env python3
"""Reproduce benchmarks/adaptive-shapes.json: adaptive (ATP-style) pruning against FastV and PyramidDrop at the same
average image-token count, on shapes-llava's shipped ATP modules.

    python tools/run_adaptive_benchmarks.py [--n 500] [--speed-requests 40] [--rounds 5]

1. Accuracy: export the adaptive engine (--method adaptive) and answer the held-out shapes questions through ONNX
   Runtime (greedy, batch 32); the mean kept count at the last stage over those questions is the budget at which
   FastV (layer 2, the adaptive stage's layer) and PyramidDrop (last-stage count) are exported and evaluated on the
   same questions. Per question type: accuracy and the adaptive stage's mean count.
2. Batch-1 prefill speed: the prefill graphs of adaptive (K = the request's own count), adaptive --static-cap
   (K = cap), FastV at the same average and the unreduced engine, on the same prefill inputs, interleaved request
   by request and round by round in one process (the machine is shared; ratios within a run are what is compared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.eval.harness import evaluate, question_prompt, shapes_items  # noqa: E402
from leanvlm.export import ExportOptions, export_engine  # noqa: E402
from leanvlm.models.loading import resolve_model  # noqa: E402
from leanvlm.reduction.atp import read_record  # noqa: E402
from leanvlm.runtime import Pipeline  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

MODEL = "shapes-llava"
N_IMAGE = 144
BATCH = 32


def export(work: Path, name: str, **opts) -> Path:
    out = work / name
    export_engine(ExportOptions(model=MODEL, out=out, max_batch=BATCH, force=True, **opts))
    return out


def accuracy(out: Path, items) -> tuple[dict, list]:
    report = evaluate(Pipeline.load(out), items, BATCH)
    per_type = {k: round(v["accuracy"], 4) for k, v in sorted(report.per_type.items())}
    return {"accuracy": round(report.accuracy, 4), "per_type": per_type, "eval_s": round(report.seconds, 1)}, \
        report.predictions


def prefill_speed(engines: dict[str, Path], items, rounds: int) -> dict:
    """Median batch-1 prefill seconds per engine over the same requests, interleaved; and per request the
    adaptive/FastV ratio."""
    pipes = {name: Pipeline.load(out, threads=1) for name, out in engines.items()}
    first = next(iter(pipes.values()))
    feeds = []
    for it in items:  # the vision and embed graphs are the same in every engine here (LLM stages only)
        b = first.preprocess([it.image], [question_prompt(it.question)])
        be = first.backend
        feeds.append((be.embed(b.input_ids, be.vision(b.pixel_values)[0]), b.attention_mask, b.position_ids,
                      b.image_start))
    times = {name: [[] for _ in items] for name in pipes}
    kept = {name: [0] * len(items) for name in pipes}
    names = list(pipes)
    for r in range(rounds + 1):  # round 0 warms up
        for i, feed in enumerate(feeds):
            order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
            for name in order:
                t0 = time.perf_counter()
                _, _, k, _ = pipes[name].backend.prefill(*feed)
                dt = time.perf_counter() - t0
                if r:
                    times[name][i].append(dt)
                kept[name][i] = int((k[-1] >= 0).sum()) if k else N_IMAGE
    med = {name: [statistics.median(t) for t in ts] for name, ts in times.items()}
    ratio = [a / f for a, f in zip(med["adaptive"], med["fastv"])]
    return {
        "requests": len(items), "rounds": rounds, "threads": 1,
        "median_ms": {n: round(1e3 * statistics.median(m), 3) for n, m in med.items()},
        "mean_ms": {n: round(1e3 * statistics.mean(m), 3) for n, m in med.items()},
        "mean_image_tokens_last_stage": {n: round(float(np.mean(k)), 2) for n, k in kept.items()},
        "adaptive_over_fastv": {"median_of_per_request_ratios": round(statistics.median(ratio), 4),
                                "ratio_of_means": round(statistics.mean(med["adaptive"]) /
                                                        statistics.mean(med["fastv"]), 4)},
        "static_cap_over_fastv": round(statistics.mean(med["adaptive-static-cap"]) /
                                       statistics.mean(med["fastv"]), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="held-out samples (test split, seed 0)")
    ap.add_argument("--speed-requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-adaptive"))
    args = ap.parse_args()
    fresh_workdir(args.work)
    items = shapes_items(args.n)
    record = read_record(resolve_model(MODEL))
    t0 = time.perf_counter()

    adaptive = export(args.work, "adaptive", method="adaptive")
    rows = {}
    rows["adaptive"], preds = accuracy(adaptive, items)
    counts = [p["kept_counts"][-1] for p in preds]
    mean = float(np.mean(counts))
    by_type: dict[str, list] = {}
    for it, c in zip(items, counts):
        by_type.setdefault(it.qtype, []).append(c)
    rows["adaptive"].update(mean_image_tokens_last_stage=round(mean, 2), min_kept=min(counts), max_kept=max(counts),
                            mean_kept_per_type={k: round(float(np.mean(v)), 2) for k, v in sorted(by_type.items())})
    budget = round(mean)
    keep = budget / N_IMAGE
    engines = {"adaptive": adaptive,
               "adaptive-static-cap": export(args.work, "adaptive-static", method="adaptive", static_cap=True),
               "fastv": export(args.work, "fastv", method="fastv", keep=keep, layer=record["stages"][-1]["layer"]),
               "pdrop": export(args.work, "pdrop", method="pdrop", keep=keep),
               "unreduced": export(args.work, "unreduced", method="fastv", keep=1.0)}
    for name in ("fastv", "pdrop", "unreduced"):
        rows[name], _ = accuracy(engines[name], items)
        rows[name]["mean_image_tokens_last_stage"] = N_IMAGE if name == "unreduced" else budget
    for name, r in rows.items():
        print(f"{name:12s} accuracy {r['accuracy']:.3f} at {r['mean_image_tokens_last_stage']} image tokens "
              f"{r['per_type']}", flush=True)
    speed_items = shapes_items(args.speed_requests)
    speed = prefill_speed({k: engines[k] for k in ("adaptive", "adaptive-static-cap", "fastv", "unreduced")},
                          speed_items, args.rounds)
    print(json.dumps(speed, indent=2))
    report = {
        "command": f"python tools/run_adaptive_benchmarks.py --n {args.n} --speed-requests {args.speed_requests} "
                   f"--rounds {args.rounds}",
        "machine": machine(),
        "model": f"{MODEL} (4 decoder layers, 144 image tokens) with its shipped ATP module(s): "
                 f"{record['stages']}, trained at target keep {record['target_keep']} ({record['training']['command']})",
        "data": f"shapes task, test split, seed 0, first {args.n} samples (ATP training used the train split and "
                f"held-out test indices from 10000)",
        "settings": {"backend": "onnxruntime CPU", "batch": BATCH, "decoding": "greedy, max 8 new tokens",
                     "budget": f"FastV (layer {record['stages'][-1]['layer']}) and PyramidDrop keep {budget} of "
                               f"{N_IMAGE} image tokens at their last stage: the adaptive engine's mean over the "
                               "same questions, rounded"},
        "accuracy": rows,
        "prefill_batch1": speed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = ROOT / "benchmarks" / "adaptive-shapes.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
