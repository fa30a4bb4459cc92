"""Every string the synthetic generator can emit, in one place.

`synth.generate()` builds its records from these templates and `synth.corpus_texts()` enumerates them, so
the tokenizer trained on the corpus at model-init time always covers the data. Change wording here only.
"""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    # Saturated, far apart in RGB (min pairwise L2 distance > 120) so a tiny random tower separates them.
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 192),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What do you see in the picture?",
    "Give a short description of the image.",
    "Caption this image.",
)

# Question wording never depends on the number of shapes: in a multi-turn record an earlier question
# saying "the shape" vs "the shapes" would leak the count answer to the model.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is shown?", "Which colour do you see?", "What colour is used in the image?"),
    "shape": ("What shape is shown?", "Which shape do you see?", "What kind of shape is in the image?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "position": (
        "Where is the shape?",
        "In which part of the image is the shape?",
        "Where is the object located?",
    ),
}

# One-word (or two-word for quadrants) answers; digits for counts because VQA normalisation maps
# number words to digits anyway.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(c) for c in COUNTS),
    "position": QUADRANTS,
}


def join_quadrants(quadrants: list[str]) -> str:
    """["top left", "bottom right"] -> "top left and bottom right"; three -> "a, b and c"."""
    if len(quadrants) == 1:
        return quadrants[0]
    return ", ".join(quadrants[:-1]) + " and " + quadrants[-1]


def caption(shape: str, colour: str, size: str, quadrants: list[str]) -> str:
    """E.g. "two small red circles at the top left and bottom right." (quadrants in canonical order)."""
    count = len(quadrants)
    noun = shape if count == 1 else PLURALS[shape]
    return f"{COUNT_WORDS[count]} {size} {colour} {noun} at the {join_quadrants(quadrants)}."


def answer(question_type: str, shape: str, colour: str, quadrants: list[str]) -> str:
    if question_type == "colour":
        return colour
    if question_type == "shape":
        return shape
    if question_type == "count":
        return str(len(quadrants))
    if question_type == "position":
        if len(quadrants) != 1:
            raise ValueError("position questions are only defined for scenes with one shape")
        return quadrants[0]
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
