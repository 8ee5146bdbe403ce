"""The one source of question/answer templates and placeholder tokens (train, eval and chat use these).

A question reads ``<depth>\\n<image>\\n`` + a request that names the expression: the depth placeholder
comes before the image placeholder, both are single special tokens that the collator expands to the
real number of visual tokens. The answer contains one ``[SEG]`` per requested mask.
"""

from __future__ import annotations

import random

from utils.tokens import DEPTH_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN

QUESTION_TEMPLATES: tuple[str, ...] = (
    "This is a light field with its disparity map. Can you segment {expr} in this image?",
    "Given the light field and its disparity map, please segment {expr} in this image.",
    "What is {expr} in this light field? Please respond with a segmentation mask.",
    "Using the disparity map, where is {expr} in this image? Please output a segmentation mask.",
)
ANSWER_TEMPLATES: tuple[str, ...] = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
VAL_QUESTION = QUESTION_TEMPLATES[0]
VAL_ANSWER = ANSWER_TEMPLATES[1]


def visual_prefix(use_depth: bool, use_mm_start_end: bool) -> str:
    """Placeholder text put in front of the first question: depth (optional) then image."""
    parts = []
    if use_depth:
        parts.append(_wrap(DEPTH_TOKEN, use_mm_start_end))
    parts.append(_wrap(IMAGE_TOKEN, use_mm_start_end))
    return "\n".join(parts) + "\n"


def _wrap(token: str, use_mm_start_end: bool) -> str:
    return f"{IM_START_TOKEN}{token}{IM_END_TOKEN}" if use_mm_start_end else token


def clean_expression(expr: str) -> str:
    """Normalise an expression for insertion into a question (strip, drop a final full stop)."""
    text = " ".join(expr.strip().split())
    if not text:
        raise ValueError("empty referring expression")
    return text.rstrip(" .")


def question(expr: str, rng: random.Random | None = None) -> str:
    """A question about ``expr``; random template when ``rng`` is given, the fixed eval form otherwise."""
    tpl = rng.choice(QUESTION_TEMPLATES) if rng is not None else VAL_QUESTION
    return tpl.format(expr=clean_expression(expr))


def answer(rng: random.Random | None = None) -> str:
    """An answer with one ``[SEG]``; random variant in training, the fixed form otherwise."""
    return rng.choice(ANSWER_TEMPLATES) if rng is not None else VAL_ANSWER


def build_turns(
    expressions: list[str],
    *,
    use_depth: bool,
    use_mm_start_end: bool,
    pack: bool,
    rng: random.Random | None = None,
    with_answer: bool = True,
) -> list[list[tuple[str, str | None]]]:
    """Conversations for one scene.

    ``pack=False`` (the paper): one single-turn conversation per expression, each starting with the
    visual placeholders. ``pack=True``: one multi-turn conversation, visual placeholders once, one
    ``[SEG]`` per turn. Returns a list of conversations, each a list of (question, answer) turns.
    """
    prefix = visual_prefix(use_depth, use_mm_start_end)
    turns = [(question(e, rng), answer(rng) if with_answer else None) for e in expressions]
    if pack:
        first_q, first_a = turns[0]
        return [[(prefix + first_q, first_a), *turns[1:]]]
    return [[(prefix + q, a)] for q, a in turns]
