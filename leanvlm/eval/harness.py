"""`leanvlm eval`: exact-match accuracy of an engine on the shapes task or on a JSONL file, per question type.

JSONL: one object per line, {"image": "path (relative to the file)", "question": "...", "answers": ["..."]},
optional "type". Predictions and answers are compared after normalisation (lower case, punctuation and
articles removed, digits 0-4 as words), against any accepted answer.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from leanvlm.errors import UserError

_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower case, no punctuation or articles, digits as words: 'A Circle.' -> 'circle', '2' -> 'two'."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


@dataclass
class Item:
    image: object  # path or PIL image
    question: str
    answers: list[str]
    qtype: str = "all"


@dataclass
class EvalReport:
    n: int
    correct: int
    per_type: dict = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "seconds": self.seconds,
             "per_type": self.per_type}
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def load_jsonl(path: str | Path) -> list[Item]:
    """Read a JSONL eval file; errors name the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--data {path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected an object with image, question and answers")
        missing = [k for k in ("image", "question", "answers") if k not in obj]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}")
        answers = obj["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{where}: answers must be a non-empty list of strings")
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise UserError(f"{where}: question must be a non-empty string")
        image = (path.parent / str(obj["image"])).resolve()
        if not image.is_file():
            raise UserError(f"{where}: image {obj['image']} not found (looked for {image})")
        items.append(Item(image, obj["question"], answers, str(obj.get("type", "all"))))
    if not items:
        raise UserError(f"--data {path}: no samples (the file is empty)")
    return items


def question_prompt(question: str) -> str:
    """What the model is asked for a question: short-answer tasks ask for one word."""
    return f"{question} Answer with one word."


def shapes_items(n: int, seed: int = 0) -> list[Item]:
    """The held-out (test) split of the shapes task at the engine's image size."""
    from leanvlm.eval.shapes import generate

    if n < 1:
        raise UserError(f"--n {n}: must be >= 1")
    return [Item(s.image, s.question, s.answers, s.qtype) for s in generate(n, seed, "test")]


def evaluate(pipe, items: list[Item], batch_size: int | None = None, max_new_tokens: int = 8,
             on_batch=None) -> EvalReport:
    """Greedy answers for every item, batched; exact match after normalisation."""
    limit = pipe.spec.limits.max_batch
    batch_size = min(batch_size or limit, limit)
    report = EvalReport(0, 0)
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        results = pipe.generate(images=[i.image for i in chunk],
                                prompts=[question_prompt(i.question) for i in chunk],
                                max_new_tokens=max_new_tokens)
        for item, res in zip(chunk, results):
            prediction = normalize(res.text.strip().splitlines()[0] if res.text.strip() else "")
            ok = prediction in {normalize(a) for a in item.answers}
            report.n += 1
            report.correct += ok
            t = report.per_type.setdefault(item.qtype, {"n": 0, "correct": 0})
            t["n"] += 1
            t["correct"] += ok
            report.predictions.append({"question": item.question, "prediction": prediction,
                                       "answers": item.answers, "correct": ok, "tokens": res.token_ids,
                                       "kept_counts": res.kept_counts})
        if on_batch:
            on_batch(report.n, len(items))
    for t in report.per_type.values():
        t["accuracy"] = t["correct"] / t["n"]
    report.seconds = time.perf_counter() - t0
    return report
