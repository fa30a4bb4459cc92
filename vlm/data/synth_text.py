"""The synthetic world's vocabulary and question wordings: colours, shapes, instructions, questions (seen and
held out), yes/no wordings, answers and the canonical caption.

Paraphrases live in `synth_para.py`, conversation and text-only templates in `synth_mix.py`. `synth.corpus_texts()`
enumerates all three, so the tokenizer trained on the corpus at model-init time covers every word of the data.
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
    "Summarise the picture in one sentence.",
    "Write a caption for the picture.",
    "Briefly describe what is shown.",
    "What does this image show?",
)
DESCRIBE_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a detailed description of every object in the picture.",
    "Describe each object in the image: its colour, size, shape and position.",
    "List every object you see, with its colour, size, shape and position.",
    "Tell me about each shape in the picture in detail.",
)

# LLaVA-1.5's short-answer prompt (its VQAv2/GQA training data and its VQA/POPE eval prompts): appended to every
# short-answer question, in training and in eval alike.
SHORT_ANSWER = "Answer the question using a single word or phrase."

# Question wording never depends on the number of shapes: in a multi-turn record an earlier question
# saying "the shape" vs "the shapes" would leak the count answer to the model.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is shown?",
        "Which colour do you see?",
        "What colour is used in the image?",
        "What color is shown?",
        "What colour does the shape have?",
        "Name the colour in the picture.",
        "Tell me the colour of the object.",
        "What is the color of the shape?",
        "Which color appears in the picture?",
        "Can you tell me the colour?",
        "What colour are the objects in the image?",
        "Which colour is the shape painted in?",
    ),
    "shape": (
        "What shape is shown?",
        "Which shape do you see?",
        "What kind of shape is in the image?",
        "Name the shape in the picture.",
        "What is the shape of the object?",
        "Which kind of object is shown?",
        "What type of shape appears in the picture?",
        "Tell me the shape of the object.",
        "Can you tell me the shape?",
        "What sort of shape is drawn?",
        "Which shape is drawn in the image?",
        "What shape are the objects?",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes.",
        "What is the number of shapes?",
        "How many shapes do you see?",
        "How many objects are shown?",
        "How many shapes are drawn in the picture?",
        "Count the objects in the image.",
        "Tell me how many shapes there are.",
        "What number of objects is shown?",
        "How many things are in the picture?",
        "Can you count the shapes?",
    ),
    "position": (
        "Where is the shape?",
        "In which part of the image is the shape?",
        "Where is the object located?",
        "In which corner is the shape?",
        "Where in the picture is the object?",
        "Which part of the image is the object in?",
        "Where is the shape drawn?",
        "Tell me where the object is.",
        "In which quadrant is the shape?",
        "What is the position of the object?",
        "Where can you see the shape?",
        "Which corner of the picture is the shape in?",
    ),
}

# Phrasings that NO training record uses (not in any *_train or lm_train file): `vqa_eval` asks about half its
# questions in these (`phrasing: heldout`) to measure whether the model learned language or templates. They
# recombine words the training text does use, so a drop measures generalisation, not unknown words.
HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What is the colour of the object in the picture?",
        "Which color does the object have?",
        "Tell me which colour you see in the image.",
        "What colour can you see?",
    ),
    "shape": (
        "What kind of object can you see in the image?",
        "Which shape appears in the picture?",
        "Tell me which shape is drawn.",
        "What is the type of shape in the picture?",
    ),
    "count": (
        "How many objects can you see?",
        "What is the number of objects in the picture?",
        "Tell me the number of shapes shown.",
        "How many shapes are in the image?",
    ),
    "position": (
        "Where in the image is the shape located?",
        "In which part of the picture is the object?",
        "Tell me the position of the shape.",
        "Which quadrant of the image is the object in?",
    ),
}
PHRASINGS = ("seen", "heldout")

# Yes/no existence questions ({} is "a red circle"). The first is POPE's, used verbatim by pope_eval.
YESNO_QUESTIONS: tuple[str, ...] = (
    "Is there {} in the image?",
    "Is there {} in the picture?",
    "Do you see {}?",
    "Does the image contain {}?",
    "Can you see {} in the image?",
    "Is {} shown?",
    "Does the picture show {}?",
    "Is {} drawn in the image?",
)

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
