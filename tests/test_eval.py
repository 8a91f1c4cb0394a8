"""The shapes task generator and the eval harness (scoring, JSONL errors)."""

import json

import pytest

from leanvlm import Pipeline
from leanvlm.cli import main
from leanvlm.errors import UserError
from leanvlm.eval.harness import Item, evaluate, load_jsonl, normalize
from leanvlm.eval.shapes import QUESTION_TYPES, Shape, ask, generate, render, sample


def test_generator_is_deterministic_and_splits_differ():
    a, b = generate(8, seed=3), generate(8, seed=3)
    assert [(x.question, x.answers, x.image.tobytes()) for x in a] == [(x.question, x.answers, x.image.tobytes()) for x in b]
    train = generate(8, seed=3, split="train")
    assert [x.image.tobytes() for x in train] != [x.image.tobytes() for x in a]
    assert sample(3, "test", 5).question == a[5].question
    assert {x.qtype for x in generate(200)} == set(QUESTION_TYPES)


class _Fixed:
    """A generator stub whose integers() replays given values (to pick a question deterministically)."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, *_):
        return self.values.pop(0)


def test_answers_follow_the_scene():
    scene = (Shape("circle", "red", 0, 0.8), Shape("square", "red", 5, 0.8), Shape("triangle", "blue", 6, 0.8))
    assert ask(scene, _Fixed(1), "colour_at") == ("What colour is the shape at the right?", "red", "colour_at")
    assert ask(scene, _Fixed(0), "count") == ("How many red shapes are there?", "two", "count")
    assert ask(scene, _Fixed(3), "count")[1] == "zero"  # yellow
    assert ask(scene, _Fixed(2), "exists")[1] == "yes" and ask((scene[0],), _Fixed(1), "exists")[1] == "no"
    q, answer, _ = ask(scene, _Fixed(0, 1), "left_of")
    assert q == "Which is further left, the red circle or the red square?" and answer == "circle"


def test_left_of_never_names_an_ambiguous_shape():
    for s in generate(300, seed=1):
        if s.qtype == "left_of":
            names = [f"{x.colour} {x.kind}" for x in s.scene]
            for name in names:
                if f"the {name} " in s.question or f"the {name}?" in s.question:
                    assert names.count(name) == 1


def test_render_puts_colour_in_the_named_cell():
    img = render((Shape("square", "green", 2, 0.9),), size=90)
    assert img.getpixel((75, 15)) == (40, 165, 60)  # top right cell centre
    assert img.getpixel((15, 75)) == (238, 236, 228)  # bottom left: background


@pytest.mark.parametrize("raw, norm", [("A Circle.", "circle"), ("2", "two"), (" Yes!", "yes"), ("the red", "red")])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_evaluate_scores_exact_match_per_type(engines):
    pipe = Pipeline.load(engines(0.33).out)
    items = [Item(s.image, s.question, s.answers, s.qtype) for s in generate(6)]
    first = evaluate(pipe, items, batch_size=4)
    assert first.n == 6 and sum(t["n"] for t in first.per_type.values()) == 6
    # accepted answers = what the engine says: all correct; a different answer: none
    right = [Item(i.image, i.question, [p["prediction"] or "-"], i.qtype) for i, p in zip(items, first.predictions)]
    assert evaluate(pipe, right, batch_size=4).accuracy == pytest.approx(
        sum(bool(p["prediction"]) for p in first.predictions) / 6)
    wrong = [Item(i.image, i.question, ["zzz-not-a-word"], i.qtype) for i in items]
    assert evaluate(pipe, wrong).accuracy == 0.0


def _write(tmp_path, lines, image=True):
    if image:
        render((Shape("circle", "red", 4, 0.8),)).save(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def test_jsonl_loads_relative_images(tmp_path):
    path = _write(tmp_path, [json.dumps({"image": "img.png", "question": "Is there a circle?", "answers": "yes"}),
                             "", json.dumps({"image": "img.png", "question": "Colour?", "answers": ["red", "Red"],
                                             "type": "colour"})])
    items = load_jsonl(path)
    assert len(items) == 2 and items[0].answers == ["yes"] and items[1].qtype == "colour"


@pytest.mark.parametrize("lines, message", [
    (['{"image": "img.png", "question": "q", "answers": ["a"]}', "{not json"], r"line 2: not valid JSON"),
    (['{"image": "img.png", "answers": ["a"]}'], r"line 1: missing question"),
    (['{"image": "nope.png", "question": "q", "answers": ["a"]}'], r"line 1: image nope.png not found"),
    (['{"image": "img.png", "question": "q", "answers": []}'], r"line 1: answers must be a non-empty list"),
    (['["img.png", "q"]'], r"line 1: expected an object"),
    ([], r"no samples \(the file is empty\)"),
])
def test_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        load_jsonl(_write(tmp_path, lines))


def test_eval_cli(capsys, engines, tmp_path):
    out = str(engines(0.33).out)
    assert main(["eval", out, "--task", "shapes", "--n", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 5 and 0 <= report["accuracy"] <= 1 and report["per_type"]
    bad = _write(tmp_path, ['{"image": "img.png"}'])
    assert main(["eval", out, "--data", str(bad)]) == 2
    assert "line 1: missing question, answers" in capsys.readouterr().err
    assert main(["eval", out]) == 2
    assert main(["eval", out, "--data", str(tmp_path / "missing.jsonl")]) == 2
