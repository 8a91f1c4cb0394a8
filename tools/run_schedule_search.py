#!/usr/bin/env python3
"""Reproduce benchmarks/schedule-search.json and schedule-search.png: searched schedules (G-Search, P-Sigmoid)
against the presets at the same prefill-FLOPs budgets, and what the search costs.

    python tools/run_schedule_search.py [--model shapes-llava-8l] [--calib-n 200] [--eval-n 500] [--trials 24]

1. G-Search (`leanvlm calib gsearch`, --tolerance) and P-Sigmoid (`leanvlm calib psigmoid`) at each budget, on the
   shapes task's calib split; their schedule files go to benchmarks/schedule-search/.
2. Every schedule is answered on the held-out test split (seed 0, first --eval-n questions) by the PyTorch
   reference (greedy, as `leanvlm eval --backend torch`; the exported engines match it: see the parity tests),
   next to FastV at every layer K with the largest keep within the budget (the best K is picked on this held-out
   set, which favours FastV) and PyramidDrop with the largest keep within the budget.
3. Search speed: G-Search with saved layer states and the cached vision output vs scoring every candidate from
   scratch, on --speed-n samples, both in this process, the naive one first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.calib.gsearch import gsearch  # noqa: E402
from leanvlm.calib.run import SearchOptions, run_gsearch, run_psigmoid  # noqa: E402
from leanvlm.calib.scoring import Scorer, search_items  # noqa: E402
from leanvlm.errors import UserError  # noqa: E402
from leanvlm.eval.harness import shapes_items  # noqa: E402
from leanvlm.models import load_model  # noqa: E402
from leanvlm.reduction.flops import prefill_flops_ratio  # noqa: E402
from leanvlm.reduction.schedule import Schedule  # noqa: E402
from run_benchmarks import fresh_workdir, machine  # noqa: E402

BENCH = ROOT / "benchmarks"


def largest_within(make, budget: float, flops):
    """The schedule of the largest keep in (0, 1] that `make(keep)` accepts within `budget` (bisection: FLOPs
    grow with keep), or None."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(30):
        mid = (lo + hi) / 2
        try:
            s = make(mid)
        except UserError:  # keeps no token
            lo = mid
            continue
        if flops(s) <= budget:
            lo, best = mid, s
        else:
            hi = mid
    return best


def fastv_within(L: int, n: int, layer: int, budget: float, flops):
    """FastV at `layer` with the most tokens (a count, not a rounded fraction) within the budget."""
    for c in range(n - 1, 0, -1):
        s = Schedule.fastv(L, n, c / n, layer)
        if flops(s) <= budget:
            return s
    return None


def _rel(path: Path) -> str:
    path = path.absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def row(name: str, schedule: Schedule, metric, flops, **extra) -> dict:
    return {"method": name, "prefill_flops_ratio": round(flops(schedule), 4), "accuracy": metric.accuracy,
            "correct": metric.correct, "kl": round(metric.kl, 5),
            "image_tokens_per_layer": schedule.image_tokens_per_layer(), **extra}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.4), dpi=120)
    rows = report["rows"]
    styles = {"fastv": ("o", "tab:blue"), "pdrop": ("s", "tab:orange"), "psigmoid": ("^", "tab:green")}
    for m, (marker, colour) in styles.items():
        pts = sorted((r["prefill_flops_ratio"], 100 * r["accuracy"]) for r in rows if r["method"] == m
                     and r.get("best_k", True))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                label="FastV (best K)" if m == "fastv" else {"pdrop": "PyramidDrop", "psigmoid": "P-Sigmoid"}[m])
    other = [r for r in rows if r["method"] == "fastv" and not r.get("best_k")]
    ax.scatter([r["prefill_flops_ratio"] for r in other], [100 * r["accuracy"] for r in other], s=10,
               color="tab:blue", alpha=0.3, label="FastV (other K)")
    g = next(r for r in rows if r["method"] == "gsearch")
    ax.scatter([g["prefill_flops_ratio"]], [100 * g["accuracy"]], marker="*", s=160, color="tab:red", zorder=5,
               label=f"G-Search (tolerance {report['settings']['tolerance']})")
    base = 100 * report["unreduced"]["accuracy"]
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="unreduced")
    for b in report["settings"]["budgets"]:
        ax.axvline(b, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("theoretical LLM prefill FLOPs (fraction of unreduced)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{report['model']}: searched vs preset schedules (PyTorch reference, greedy)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-llava-8l")
    ap.add_argument("--calib-n", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.55, 0.4])
    ap.add_argument("--speed-n", type=int, default=48, help="samples for the search-speed comparison (0: skip)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=BENCH / "schedule-search.json")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fresh_workdir(Path("/tmp/leanvlm-schedule-search"))
    sched_dir = args.out.with_suffix("")
    sched_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    # 1. searches, through the same entry points as the CLI
    searches = {}
    g_file = sched_dir / f"gsearch-t{args.tolerance:g}.yaml"
    g, g_rec = run_gsearch(SearchOptions(model=args.model, out=g_file, n=args.calib_n, tolerance=args.tolerance,
                                         force=True))
    searches["gsearch"] = {"file": _rel(g_file), **g_rec}
    print(f"G-Search: {g_rec['image_tokens_per_layer']} FLOPs {g_rec['prefill_flops_ratio']:.3f} calib acc "
          f"{g_rec['accuracy']:.3f} in {g_rec['wall_time_s']} s", flush=True)
    p_files = {}
    for b in args.budgets:
        f = sched_dir / f"psigmoid-b{b:g}.yaml"
        _, rec = run_psigmoid(SearchOptions(model=args.model, out=f, n=args.calib_n, budget=b, trials=args.trials,
                                            force=True))
        p_files[b] = f
        searches[f"psigmoid-{b:g}"] = {"file": _rel(f), **rec}
        print(f"P-Sigmoid {b}: {rec['image_tokens_per_layer']} FLOPs {rec['prefill_flops_ratio']:.3f} calib acc "
              f"{rec['accuracy']:.3f} in {rec['wall_time_s']} s", flush=True)

    # 2. held-out evaluation on the PyTorch reference
    loaded = load_model(args.model)
    t_eval = time.perf_counter()
    ev = Scorer(loaded, shapes_items(args.eval_n), batch=32)
    L, N = ev.num_layers, ev.num_image_tokens
    cfg = loaded.model.config.text_config
    tt = ev.text_tokens()
    flops = lambda s: prefill_flops_ratio(s, tt, cfg.hidden_size, cfg.intermediate_size,  # noqa: E731
                                          cfg.num_key_value_heads / cfg.num_attention_heads)
    print(f"unreduced held-out accuracy {ev.baseline.accuracy:.3f}", flush=True)
    rows = [row("gsearch", g.schedule, ev.score(g.schedule), flops, file=searches["gsearch"]["file"])]
    for b in args.budgets:
        s = Schedule.from_file(p_files[b], L, N)
        rows.append(row("psigmoid", s, ev.score(s), flops, budget=b, file=searches[f"psigmoid-{b:g}"]["file"]))
        fast = []
        for k in range(1, L):
            fs = fastv_within(L, N, k, b, flops)
            if fs is not None:
                fast.append(row("fastv", fs, ev.score(fs), flops, budget=b, layer=k, keep=fs.stages[0].num_keep))
        best = max(fast, key=lambda r: (r["accuracy"], -r["kl"]))
        for r in fast:
            r["best_k"] = r is best
        rows += fast
        pd = largest_within(lambda keep: Schedule.pdrop(L, N, keep), b, flops)
        if pd is not None:
            rows.append(row("pdrop", pd, ev.score(pd), flops, budget=b, keep=round(pd.stages[-1].keep, 4)))
        print(f"budget {b}: " + ", ".join(f"{r['method']}{'' if 'layer' not in r else ' K=' + str(r['layer'])} "
                                          f"{r['accuracy']:.3f}" for r in rows if r.get("budget") == b), flush=True)
    eval_s = time.perf_counter() - t_eval

    # 3. search speed: naive first, then with saved states (same process, same settings)
    speed = None
    if args.speed_n:
        items = search_items("shapes", args.speed_n)
        speed = {"n": args.speed_n, "tolerance": 0.0, "steps": 24}
        for name, reuse in (("naive", False), ("resumed", True)):
            t0 = time.perf_counter()
            sc = Scorer(loaded, items, batch=32, reuse=reuse)
            res = gsearch(sc, 0.0)
            speed[name] = {"seconds": round(time.perf_counter() - t0, 1), **sc.stats.to_dict(),
                           "stages": [[s.layer, s.num_keep] for s in res.schedule.stages]}
        assert speed["naive"]["stages"] == speed["resumed"]["stages"]
        speed["speedup"] = round(speed["naive"]["seconds"] / speed["resumed"]["seconds"], 2)
        print(f"search speed: naive {speed['naive']['seconds']} s, resumed {speed['resumed']['seconds']} s "
              f"({speed['speedup']}x)", flush=True)

    cmd = (f"python tools/run_schedule_search.py --model {args.model} --calib-n {args.calib_n} --eval-n {args.eval_n} "
           f"--tolerance {args.tolerance} --trials {args.trials} --budgets {' '.join(map(str, args.budgets))} "
           f"--speed-n {args.speed_n} --out {_rel(args.out)}" + (f" --threads {args.threads}" if args.threads else ""))
    report = {"command": cmd, "machine": machine(), "model": args.model,
              "data": {"calibration": f"shapes calib split, seed 0, {args.calib_n} samples",
                       "evaluation": f"shapes test split, seed 0, first {args.eval_n} samples (leanvlm eval's)"},
              "settings": {"evaluated_on": "PyTorch reference (torch backend), fp32, greedy, max 8 new tokens",
                           "budgets": args.budgets, "tolerance": args.tolerance, "trials": args.trials,
                           "flops_text_tokens": tt, "threads": torch.get_num_threads(),
                           "fastv": "every layer K in 1..L-1 with the most tokens within the budget; best K "
                                    "picked on the held-out set",
                           "pdrop": "preset (1/4, 1/2, 3/4 depth) with the largest keep within the budget"},
              "unreduced": ev.baseline.to_dict(), "rows": rows, "searches": searches, "search_speed": speed,
              "eval_seconds": round(eval_s, 1), "total_seconds": round(time.perf_counter() - t_all, 1)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
