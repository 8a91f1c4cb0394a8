"""The `shapes` task: images of a few coloured shapes on a 3x3 grid, and questions whose answers need
specific image regions. Generated procedurally and deterministically from (seed, split).

Question types (answers are single lower-case words):
- colour_at: "What colour is the shape at the top left?" -> red
- left_of:   "Which is further left, the red circle or the blue square?" -> circle
- count:     "How many green shapes are there?" -> two
- exists:    "Is there a triangle?" -> yes / no
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 220), "yellow": (235, 195, 25)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour_at", "left_of", "count", "exists")
SPLITS = ("train", "test", "calib")  # calib: schedule searches (leanvlm calib), never trained on or evaluated
IMAGE_SIZE = 96  # shapes-llava's input size: each grid cell is 4x4 patches of 8 px


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: int  # 0..8, row-major on the 3x3 grid
    scale: float  # fraction of the cell the shape spans


@dataclass
class Sample:
    image: "object"  # PIL image
    question: str
    answers: list[str]
    qtype: str
    scene: tuple[Shape, ...] = ()


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_scene(rng: np.random.Generator) -> tuple[Shape, ...]:
    """2-4 shapes in distinct cells."""
    n = int(rng.integers(2, 5))
    cells = rng.choice(9, size=n, replace=False)
    return tuple(Shape(SHAPES[int(rng.integers(3))], list(COLOURS)[int(rng.integers(4))], int(c),
                       float(rng.uniform(0.55, 0.9))) for c in cells)


def render(scene: tuple[Shape, ...], size: int = IMAGE_SIZE):
    """Draw a scene on a light background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (238, 236, 228))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for s in scene:
        r, c = divmod(s.cell, 3)
        cx, cy, half = (c + 0.5) * cell, (r + 0.5) * cell, s.scale * cell / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif s.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return img


def ask(scene: tuple[Shape, ...], rng: np.random.Generator, qtype: str | None = None) -> tuple[str, str, str]:
    """(question, answer, type) about `scene`; left_of falls back to another type when no pair fits."""
    qtype = qtype or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    if qtype == "colour_at":
        s = scene[int(rng.integers(len(scene)))]
        return f"What colour is the shape at the {CELLS[s.cell]}?", s.colour, qtype
    if qtype == "left_of":
        unique = [s for s in scene if sum((t.kind, t.colour) == (s.kind, s.colour) for t in scene) == 1]
        pairs = [(a, b) for a in unique for b in unique  # "the blue circle" must name one shape
                 if a.kind != b.kind and a.cell % 3 < b.cell % 3]
        if not pairs:
            return ask(scene, rng, "exists")
        a, b = pairs[int(rng.integers(len(pairs)))]
        first, second = (a, b) if rng.integers(2) else (b, a)
        return (f"Which is further left, the {first.colour} {first.kind} or the {second.colour} {second.kind}?",
                a.kind, qtype)
    if qtype == "count":
        colour = list(COLOURS)[int(rng.integers(4))]
        return f"How many {colour} shapes are there?", NUMBERS[sum(s.colour == colour for s in scene)], qtype
    kind = SHAPES[int(rng.integers(3))]
    return f"Is there a {kind}?", "yes" if any(s.kind == kind for s in scene) else "no", "exists"


def sample(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> Sample:
    """The index-th sample of a split: the same (seed, split, index) always gives the same sample."""
    rng = _rng(seed, split, index)
    scene = make_scene(rng)
    question, answer, qtype = ask(scene, rng)
    return Sample(render(scene, size), question, [answer], qtype, scene)


def generate(n: int, seed: int = 0, split: str = "test", size: int = IMAGE_SIZE) -> list[Sample]:
    """n samples of a split. Each split (train, test, calib) has its own random stream."""
    return [sample(seed, split, i, size) for i in range(n)]

