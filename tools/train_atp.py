#!/usr/bin/env python3
"""Train the ATP modules of adaptive stages (leanvlm/reduction/atp.py) on the shapes task, the model frozen:

    python tools/train_atp.py --model shapes-llava --out leanvlm/assets/shapes-llava --seed 0 --target 0.25

Each step answers a batch of single-turn shapes questions (train split) with the decoder run layer by layer; at
every adaptive stage the ATP module scores the image tokens and predicts a per-sample threshold, and the soft
keep mask sigmoid((score - threshold) / tau) enters every later layer's attention as log(mask) on the image keys
(a token at mask 0 is as good as dropped; spatial tokens stay at 1). Loss: cross-entropy of the first answer
token + budget * (mean keep fraction at the last stage - target)^2 (the soft mask's mean; with --hard-budget the
engine's hard count, threshold, spatial tokens and clamp to [min, cap], with the soft mask's gradient:
straight-through), so the average count is pinned while the threshold head is free to give some questions more tokens than others (the paper's
budget-constrained training, reduced to its average term). Only the ATP modules get gradients. The number of steps is fixed, so the same
seed gives the same modules.

Writes atp.safetensors and atp.json (stages, training settings, held-out accuracy and the measured mean kept
count with hard counts, per question type) into --out, which must hold the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.eval.harness import question_prompt  # noqa: E402
from leanvlm.eval.shapes import sample  # noqa: E402
from leanvlm.models import load_model  # noqa: E402
from leanvlm.models.llava_config import num_image_tokens  # noqa: E402
from leanvlm.reduction import atp, select  # noqa: E402
from leanvlm.reduction.schedule import Schedule, adaptive_stage  # noqa: E402
from leanvlm.reference.model import ReducedLlava, image_starts, prompt_positions  # noqa: E402
from leanvlm.runtime.preprocess import chat_prompt  # noqa: E402

HELD_OUT = 10_000  # first test-split index of the held-out questions (the eval benchmarks use 0..n-1)


def encode(processor, samples, device="cpu") -> dict:
    """Left-padded prompts, pixels, image starts and the first answer token of each sample."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(images=[s.image for s in samples],
                    text=[chat_prompt(processor, question_prompt(s.question)) for s in samples],
                    return_tensors="pt", padding=True)
    target = torch.tensor([tok(" " + s.answers[0], add_special_tokens=False)["input_ids"][0] for s in samples])
    return {**{k: v.to(device) for k, v in enc.items()}, "target": target.to(device)}


def soft_forward(ref: ReducedLlava, batch: dict, spatial: dict, tau: float, hard_budget: bool = False):
    """Last-token logits with soft keep masks at the adaptive stages; also the keep fraction [B] after the last
    stage (soft, or with `hard_budget` the engine's hard count with the soft gradient). Gradients reach only the
    ATP modules."""
    n = ref.num_image_tokens
    with torch.no_grad():
        feats = ref.vision(batch["pixel_values"])[0]
        h = ref.embed(batch["input_ids"], feats)
    attn_mask = batch["attention_mask"]
    pos = prompt_positions(attn_mask)
    start = image_starts(batch["input_ids"], ref.image_token_id, n)
    mask = ref._prefill_mask(attn_mask)
    cos, sin = ref.lm.rotary_emb(h, pos)
    span = start[:, None] + torch.arange(n)[None]
    keep = torch.ones(h.shape[0], n)
    hard = torch.ones(h.shape[0])  # the last stage's count / n
    valid = torch.ones(h.shape[0], n, dtype=torch.bool)
    scores = None
    for i, layer in enumerate(ref.lm.layers):
        stage = ref.schedule.stage_at(i)
        if stage is not None:
            module = ref.atp[str(stage.layer)]
            image_h = select.gather_tokens(h, span)
            s = module.token_scores(select.image_scores(scores, start, n), image_h, valid)
            theta = module.threshold(h[:, -1], image_h, valid)
            keep = keep * atp.soft_keep(s, theta, valid, spatial[stage.layer], tau)
            # the engine's count for this sample (threshold, spatial tokens, clamp), for the budget term
            count = atp.counts(s.detach(), theta.detach(), valid, spatial[stage.layer][0].expand_as(valid),
                               stage.min_keep, stage.num_keep)
            hard = count.float() / n
            bias = torch.zeros(mask.shape[0], mask.shape[-1])
            bias = bias.scatter(1, span, torch.log(keep + 1e-9))
            mask = ref._prefill_mask(attn_mask) + bias[:, None, None, :]
        h, _, _, scores = ref._layer(layer, h, cos, sin, mask, None, None, ref.schedule.scores_at(i), attn_mask)
    logits = ref.hf.lm_head(ref.lm.norm(h[:, -1])).float()
    soft = keep.sum(1) / n
    if not hard_budget:
        return logits, soft
    # straight-through: the budget sees the hard count's fraction, its gradient flows through the soft mask
    return logits, soft + (hard - soft).detach()


@torch.no_grad()
def hard_eval(ref: ReducedLlava, processor, samples, batch: int = 50) -> dict:
    """First-token accuracy and kept counts with the hard per-sample counts (the engine's semantics)."""
    hits, counts, types, per_stage = [], [], [], []
    for a in range(0, len(samples), batch):
        chunk = samples[a: a + batch]
        b = encode(processor, chunk)
        feats = ref.vision(b["pixel_values"])[0]
        emb = ref.embed(b["input_ids"], feats)
        logits, _, kept, _ = ref.prefill(emb, b["attention_mask"], prompt_positions(b["attention_mask"]),
                                         image_starts(b["input_ids"], ref.image_token_id, ref.num_image_tokens))
        hits += (logits.argmax(-1) == b["target"]).tolist()
        counts += (kept[-1] >= 0).sum(1).tolist()
        per_stage += [[int((k[b] >= 0).sum()) for k in kept] for b in range(len(chunk))]
        types += [s.qtype for s in chunk]
    per_type = {}
    for t in sorted(set(types)):
        idx = [i for i, x in enumerate(types) if x == t]
        per_type[t] = {"n": len(idx), "accuracy": round(float(np.mean([hits[i] for i in idx])), 4),
                       "mean_kept": round(float(np.mean([counts[i] for i in idx])), 2)}
    return {"n": len(samples), "accuracy": round(float(np.mean(hits)), 4),
            "mean_kept": round(float(np.mean(counts)), 2),
            "mean_kept_per_stage": [round(float(x), 2) for x in np.mean(per_stage, 0)], "min_kept": int(min(counts)),
            "max_kept": int(max(counts)), "per_type": per_type}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--out", type=Path, required=True, help="directory to write atp.safetensors/atp.json into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[2], help="decoder layers of the adaptive stages")
    ap.add_argument("--target", type=float, default=0.25, help="average keep fraction at the last stage")
    ap.add_argument("--cap", type=float, default=0.5, help="cap per stage (fraction of the image tokens)")
    ap.add_argument("--min", type=int, default=9, dest="min_keep")
    ap.add_argument("--spatial", type=int, default=9, help="SAP: tokens on a uniform grid always kept")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau", type=float, default=0.5, help="soft-mask temperature")
    ap.add_argument("--budget", type=float, default=20.0, help="weight of the budget term")
    ap.add_argument("--hard-budget", action="store_true",
                    help="budget on the hard per-sample count (straight-through) instead of the soft mask's mean: "
                         "the soft mean overestimates the hard count (shipped module: soft 0.25 -> hard 0.22)")
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = load_model(args.model)
    model, processor = loaded.model, loaded.processor
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    n = num_image_tokens(cfg)
    cap = max(args.min_keep, round(args.cap * n))
    stages = tuple(adaptive_stage(layer, cap, args.min_keep, args.spatial, False, n) for layer in sorted(args.layers))
    schedule = Schedule(cfg.text_config.num_hidden_layers, n, stages, "adaptive")
    modules = {st.layer: atp.ATPModule(cfg.text_config.hidden_size) for st in stages}
    ref = ReducedLlava(model, schedule, modules)
    spatial = {st.layer: atp.spatial_flags(n, st.spatial)[None] for st in stages}
    size = cfg.vision_config.image_size

    # start each threshold at the score quantile that keeps `target` on the first batch, its head near constant
    first = encode(processor, [sample(args.seed, "train", i, size) for i in range(args.batch)])
    with torch.no_grad():
        for st in stages:
            mod = modules[st.layer]
            mod.head[2].weight.mul_(0.1)
            mod.head[2].bias.zero_()
        ref.eval()
        for st in stages:  # one stage at a time: the first stage's initial keep is known before the next
            _calibrate(ref, first, spatial, st, args.target ** (1 / len(stages)), n)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)
    held_out = [sample(args.seed, "test", HELD_OUT + i, size) for i in range(args.held_out)]
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = range((step - 1) * args.batch, step * args.batch)
        batch = encode(processor, [sample(args.seed, "train", i, size) for i in idx])
        logits, frac = soft_forward(ref, batch, spatial, args.tau, args.hard_budget)
        ce = torch.nn.functional.cross_entropy(logits, batch["target"])
        budget = (frac.mean() - args.target) ** 2
        loss = ce + args.budget * budget
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}/{args.steps} {(time.time() - t0) / 60:.1f} min ce {ce.item():.3f} keep "
                  f"{frac.mean().item():.3f} (min {frac.min().item():.3f} max {frac.max().item():.3f})", flush=True)
    minutes = (time.time() - t0) / 60
    measured = hard_eval(ref, processor, held_out)
    print(f"held-out (hard counts): {json.dumps(measured)}")
    record = {
        "format": "leanvlm-atp-1",
        "model": args.model, "hidden_size": cfg.text_config.hidden_size,
        "num_layers": cfg.text_config.num_hidden_layers, "num_image_tokens": n,
        "stages": [{"layer": st.layer, "cap": st.num_keep, "min": st.min_keep, "spatial": st.spatial}
                   for st in stages],
        "target_keep": args.target,
        "measured": {**measured, "mean_keep_ratio": round(measured["mean_kept"] / n, 4),
                     "data": f"shapes test split, seed {args.seed}, indices {HELD_OUT}..{HELD_OUT + args.held_out - 1}"},
        "training": {"command": "python tools/train_atp.py " + " ".join(sys.argv[1:]), "seed": args.seed,
                     "steps": args.steps, "batch": args.batch, "lr": args.lr, "tau": args.tau,
                     "budget_weight": args.budget, "hard_budget": args.hard_budget, "minutes": round(minutes, 1),
                     "data": f"shapes train split, seed {args.seed}, indices 0..{args.steps * args.batch - 1}"},
    }
    atp.save_atp(args.out, modules, record)
    print(f"wrote {args.out / atp.ATP_WEIGHTS} and {args.out / atp.ATP_RECORD} ({minutes:.1f} min)")
    return 0


@torch.no_grad()
def _calibrate(ref, batch, spatial, stage, keep: float, n: int) -> None:
    """Set the stage's threshold bias to the score quantile that keeps `keep` of the image tokens on `batch`."""
    module = ref.atp[str(stage.layer)]
    seen = {}
    original = module.token_scores

    def spy(*a):
        seen["s"] = original(*a)
        return seen["s"]

    module.token_scores = spy  # an instance attribute shadows the method for this one forward
    try:
        soft_forward(ref, batch, spatial, 1.0)
    finally:
        del module.token_scores
    free = seen["s"][:, ~spatial[stage.layer][0]]
    want = max(0.0, keep * n - stage.spatial) / free.shape[1]
    module.head[2].bias.fill_(float(torch.quantile(free.flatten(), 1 - want)))


if __name__ == "__main__":
    sys.exit(main())
