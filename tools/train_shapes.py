#!/usr/bin/env python3
"""Train the shapes-llava checkpoint on the procedural shapes task, on CPU, from a seed:

    python tools/train_shapes.py --out leanvlm/assets/shapes-llava --seed 0 --minutes 25

LLaVA-1.5 architecture at small size (transformers' CLIP vision tower + projector + Llama decoder, its own
tokenizer and chat template: make_tiny's "shapes" preset), trained end to end with teacher forcing on
"USER: <image>\\n{question} Answer with one word. ASSISTANT: {answer}</s>", loss on the answer only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanvlm.eval.shapes import sample  # noqa: E402
from leanvlm.models.tiny import build_llava, save_checkpoint  # noqa: E402

SUFFIX = " Answer with one word."


def encode(processor, samples, with_answers: bool):
    """Left-padded batch; labels cover the answer tokens and EOS only."""
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": s.question + SUFFIX}]}], add_generation_prompt=True)
        for s in samples]
    enc = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding=True)
    rows, labels = [], []
    for ids, mask, s in zip(enc["input_ids"], enc["attention_mask"], samples):
        prompt = ids[mask.bool()].tolist()
        answer = tok(" " + s.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if with_answers else []
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    length = max(map(len, rows))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    target = torch.tensor([[-100] * (length - len(lab)) + lab for lab in labels])
    positions = (attention.cumsum(1) - 1).masked_fill(attention == 0, 1)
    return dict(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                pixel_values=enc["pixel_values"]), target


def first_token_accuracy(model, processor, samples) -> tuple[float, dict]:
    """Held-out accuracy of the answer's first token, overall and per question type."""
    tok = processor.tokenizer
    inputs, _ = encode(processor, samples, with_answers=False)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    want = torch.tensor([tok(" " + s.answers[0], add_special_tokens=False)["input_ids"][0] for s in samples])
    hits = (logits.argmax(-1) == want).tolist()
    per_type: dict = {}
    for s, h in zip(samples, hits):
        per_type.setdefault(s.qtype, []).append(h)
    return sum(hits) / len(hits), {k: round(sum(v) / len(v), 2) for k, v in sorted(per_type.items())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model, processor = build_llava(args.seed, "shapes", random_spread=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    held_out = [sample(args.seed, "test", 10_000 + i) for i in range(128)]  # not the eval harness' indices
    budget, t0, step, index = args.minutes * 60, time.time(), 0, 0
    while True:
        elapsed = time.time() - t0
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [sample(args.seed, "train", index + i) for i in range(args.batch)]
        index += args.batch
        inputs, labels = encode(processor, batch, with_answers=True)
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            model.eval()
            acc, per_type = first_token_accuracy(model, processor, held_out)
            model.train()
            print(f"step {step} {elapsed / 60:.1f} min loss {loss.item():.3f} lr {lr:.2e} held-out first-token "
                  f"acc {acc:.3f} {per_type}", flush=True)
    model.eval()
    acc, per_type = first_token_accuracy(model, processor, held_out)
    print(f"done: {step} steps, {index} samples, final held-out first-token acc {acc:.3f} {per_type}", flush=True)
    save_checkpoint(model, processor, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
