#!/usr/bin/env python3
"""Reproduce benchmarks/accuracy-shapes.json and accuracy-shapes.png: what each reduction costs in accuracy.

    python tools/run_accuracy_table.py [--n 500] [--work /tmp/leanvlm-accuracy]

For every method x keep, export shapes-llava to ONNX with that schedule, answer the held-out shapes questions
through ONNX Runtime (greedy), and report exact-match accuracy, greedy-token agreement with the unreduced engine
(the whole generated answer, token for token) and the theoretical FLOPs ratios of `leanvlm plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.eval.harness import evaluate, question_prompt, shapes_items  # noqa: E402
from leanvlm.export import ExportOptions, export_engine  # noqa: E402
from leanvlm.export.engine import resolve_schedule  # noqa: E402
from leanvlm.spec import defaults  # noqa: E402
from leanvlm.models.loading import resolve_model  # noqa: E402
from leanvlm.reduction.plan import make_plan  # noqa: E402
from leanvlm.runtime import Pipeline  # noqa: E402
from leanvlm.runtime.preprocess import chat_prompt  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

METHODS = ("fastv", "pdrop", "illava", "visionzip")
# Variants that are schedule files rather than presets: VisionZip without CLS among its tokens (leanvlm 0.1's
# behaviour; the preset follows the reference code, which sends CLS to the LLM).
VARIANTS = {"visionzip-patches": "stages:\n  - {{where: projector, keep: {keep}, keep_cls: false}}\n"}
KEEPS = (0.75, 0.5, 0.33, 0.25, 0.125)
MODEL = "shapes-llava"
BATCH = 32


def run_engine(work: Path, name: str, method: str, keep: float, items, schedule: Path | None = None):
    out = work / name
    t0 = time.perf_counter()
    preset = {} if schedule else {"keep": keep, "method": method}
    export_engine(ExportOptions(model=MODEL, schedule=schedule, out=out, max_batch=BATCH, force=True, **preset))
    exported = time.perf_counter() - t0
    report = evaluate(Pipeline.load(out), items, BATCH)
    print(f"{name:18s} accuracy {report.accuracy:.3f}  (export {exported:.1f} s, eval {report.seconds:.1f} s)",
          flush=True)
    return report, {"export_s": round(exported, 2), "eval_s": round(report.seconds, 2)}


def per_type(report) -> dict[str, float]:
    return {k: v["accuracy"] for k, v in sorted(report.per_type.items())}


def plot(rows: list[dict], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in (*METHODS, *VARIANTS):
        pts = sorted((r["prefill_flops_ratio"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="unreduced")
    ax.set_xlabel("theoretical LLM prefill FLOPs (fraction of unreduced)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("shapes-llava: accuracy vs prefill FLOPs (ONNX Runtime, greedy)")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="held-out samples (test split, seed 0)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-accuracy"))
    args = ap.parse_args()
    from transformers import LlavaConfig

    fresh_workdir(args.work)
    items = shapes_items(args.n)
    cfg = LlavaConfig.from_pretrained(resolve_model(MODEL))
    base, base_run = run_engine(args.work, "unreduced", "fastv", 1.0, items)
    base_tokens = [p["tokens"] for p in base.predictions]
    text_tokens = _mean_text_tokens(items)
    rows = []
    for method in (*METHODS, *VARIANTS):
        for keep in KEEPS:
            schedule = None
            if method in VARIANTS:
                schedule = args.work / f"{method}-{keep}.yaml"
                schedule.write_text(VARIANTS[method].format(keep=keep))
            report, run = run_engine(args.work, f"{method}-{keep}", method, keep, items, schedule)
            plan = make_plan(cfg, resolve_schedule(cfg, method, keep, defaults.FASTV_LAYER, schedule), text_tokens)
            agree = sum(p["tokens"] == b for p, b in zip(report.predictions, base_tokens)) / report.n
            rows.append({"method": method, "keep": keep, "llm_image_tokens": plan.image_tokens_per_layer[-1],
                         "accuracy": report.accuracy, "greedy_agreement": agree,
                         "prefill_flops_ratio": plan.prefill_flops_ratio, "vision_flops_ratio": plan.vision_flops_ratio,
                         "per_type": per_type(report), **run})
    report = {"command": f"python tools/run_accuracy_table.py --n {args.n}", "machine": machine(),
              "model": f"{MODEL} (leanvlm/assets/shapes-llava, 144 image tokens, 4 decoder layers)",
              "data": f"shapes task, test split, seed 0, first {args.n} samples",
              "settings": {"backend": "onnxruntime CPU", "batch": BATCH, "decoding": "greedy, max 8 new tokens",
                           "keep": "fraction of the image tokens that reach the last stage", "fastv_layer": 2,
                           "text_tokens_for_flops": text_tokens},
              "unreduced": {"accuracy": base.accuracy,
                            "per_type": per_type(base), **base_run},
              "rows": rows}
    out = ROOT / "benchmarks"
    (out / "accuracy-shapes.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, base.accuracy, out / "accuracy-shapes.png")
    print(f"wrote {out / 'accuracy-shapes.json'} and {out / 'accuracy-shapes.png'}")
    return 0


def _mean_text_tokens(items) -> int:
    """Mean prompt length in text tokens (the chat template around each question; <image> not counted)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model(MODEL))
    lengths = [len(processor.tokenizer(chat_prompt(processor, question_prompt(i.question)))["input_ids"]) - 1
               for i in items]
    return round(sum(lengths) / len(lengths))


if __name__ == "__main__":
    sys.exit(main())
