"""The one source of question/answer templates and placeholder tokens (train, eval and chat use these).

A question reads ``<depth>\\n<image>\\n`` + a request that names the expression (``image_first``, LLaVA's
order), or the request then ``\\n<depth>\\n<image>`` (``expression_first``, for a base pretrained so: a
causal LM's image tokens can then attend to the expression). The depth placeholder comes before the image
placeholder; both are single special tokens that the collator expands to the real number of visual
tokens. The answer contains one ``[SEG]`` per requested mask; with ``answer_box`` it first states the
target's box (``[x0, y0, x1, y1]`` on a 0.1 grid, the pretraining's REC format), so ``[SEG]`` follows the
location the LM has just written.

A GRES model (``gres``) answers an expression that names no object with ``[REJ]`` instead of ``[SEG]``, and a
question may ask for several expressions at once (``exprs_per_question``, MLLMSeg's GRES format): "Sure,
e1: [SEG], e2: [REJ], e3: [SEG]." -- one slot per expression, in the question's order.

An ILVC answer (``--ilvc``, LIRA's format) follows its ``[SEG]`` with the region's own visual tokens (the
``<region>`` placeholder, expanded like ``<image>``) and a short description, closed by a second ``[SEG]``:
"Sure, [SEG] <region> a red car, far away, fully visible [SEG]." (``dataset/regions.py`` writes the rest).
"""

from __future__ import annotations

import random

from utils.conversation import PROMPT_ORDERS
from utils.tokens import DEPTH_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, REGION_TOKEN

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
BOX_ANSWER_TEMPLATES: tuple[str, ...] = (
    "Sure, {box} [SEG].",
    "It is at {box}: [SEG].",
    "{box} [SEG].",
)
#: ILVC answers (training only): ``{region}`` is the ``<region>`` placeholder, ``{description}`` the target's.
ILVC_ANSWER_TEMPLATES: tuple[str, ...] = (
    "Sure, [SEG] {region} {description} [SEG].",
    "It is [SEG] {region} {description} [SEG].",
    "[SEG] {region} {description} [SEG].",
)
REJ_ANSWER_TEMPLATES: tuple[str, ...] = (
    "There is no such object: [REJ].",
    "Sorry, I cannot find it: [REJ].",
    "[REJ].",
)
MULTI_QUESTION_TEMPLATES: tuple[str, ...] = (
    "This is a light field with its disparity map. Can you segment {exprs} in this image?",
    "Given the light field and its disparity map, please segment {exprs}, each with its own mask.",
)
#: The fixed answers of a GRES model (validation), by ``reject``: the slot alone, so the model's own choice
#: between ``[SEG]`` and ``[REJ]`` is what a teacher-forced evaluation reads (both are training templates).
BARE_ANSWERS: dict[bool, str] = {False: "[SEG].", True: "[REJ]."}
VAL_QUESTION = QUESTION_TEMPLATES[0]
VAL_REJ_ANSWER = REJ_ANSWER_TEMPLATES[0]
VAL_MULTI_QUESTION = MULTI_QUESTION_TEMPLATES[0]
VAL_ANSWER = ANSWER_TEMPLATES[1]
VAL_BOX_ANSWER = BOX_ANSWER_TEMPLATES[0]
BOX_STEP = 0.1
#: Semantic segmentation (``sem_seg``): a class name; half mention the disparity, as the release's do.
SEM_SEG_QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {expr} in this image? Please output a segmentation mask.",
    "Can you segment every {expr} in this light field, using its disparity map?",
    "Please segment the {expr} in this image.",
    "Given the disparity map, where is the {expr} in this image? Please respond with a segmentation mask.",
)
#: Reasoning segmentation (``reason_seg``): a full-sentence query is asked as it is, a phrase inside a question.
REASON_SENTENCE_TEMPLATES: tuple[str, ...] = (
    "{expr} Please output a segmentation mask.",
    "{expr} Please respond with a segmentation mask.",
)
REASON_PHRASE_TEMPLATES: tuple[str, ...] = (
    "What is {expr} in this image? Please output a segmentation mask.",
    "Please segment {expr} in this light field.",
)
#: A reasoning answer that also explains (``--explanatory``).
EXPLAINED_ANSWER = "Sure, [SEG]. {explanation}"
"""Grid of the boxes that ``answer_box`` answers state (11 values a coordinate, as the tiny base's REC)."""


def visual_prefix(use_depth: bool, use_mm_start_end: bool) -> str:
    """Placeholder text put in front of the first question: depth (optional) then image."""
    parts = []
    if use_depth:
        parts.append(_wrap(DEPTH_TOKEN, use_mm_start_end))
    parts.append(_wrap(IMAGE_TOKEN, use_mm_start_end))
    return "\n".join(parts) + "\n"


def _wrap(token: str, use_mm_start_end: bool) -> str:
    return f"{IM_START_TOKEN}{token}{IM_END_TOKEN}" if use_mm_start_end else token


def text_problem(text: object) -> str | None:
    """Why ``text`` cannot be an expression (not a string; bytes that were not UTF-8, which Python keeps
    as lone surrogates, e.g. from a command line or a JSON ``\\udcff`` escape), or None."""
    if not isinstance(text, str):
        return f"must be a string, got {type(text).__name__} {str(text)[:60]!r}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        return (
            f"is not valid UTF-8 text ({byte} at character {exc.start}: {text[: exc.start][-30:]!r}…); "
            "write the expression in UTF-8"
        )
    return None


def clean_expression(expr: str) -> str:
    """Normalise an expression for insertion into a question (strip, drop a final full stop)."""
    why = text_problem(expr)
    if why:
        raise ValueError(f"the expression {why}")
    text = " ".join(expr.strip().split())
    if not text:
        raise ValueError("empty referring expression")
    return text.rstrip(" .")


def question(expr: str, rng: random.Random | None = None) -> str:
    """A question about ``expr``; random template when ``rng`` is given, the fixed eval form otherwise."""
    tpl = rng.choice(QUESTION_TEMPLATES) if rng is not None else VAL_QUESTION
    return tpl.format(expr=clean_expression(expr))


def answer(rng: random.Random | None = None, box: str | None = None, reject: bool = False) -> str:
    """An answer with one ``[SEG]``, stating ``box`` (``[x0, y0, x1, y1]`` text) first when given, or with
    one ``[REJ]`` when ``reject`` (the expression names no object); random variant in training, the fixed
    form otherwise."""
    if reject:
        return rng.choice(REJ_ANSWER_TEMPLATES) if rng is not None else VAL_REJ_ANSWER
    if box is None:
        return rng.choice(ANSWER_TEMPLATES) if rng is not None else VAL_ANSWER
    return (rng.choice(BOX_ANSWER_TEMPLATES) if rng is not None else VAL_BOX_ANSWER).format(box=box)


def ilvc_answer(description: str, rng: random.Random | None = None) -> str:
    """An ILVC answer: ``[SEG]``, the ``<region>`` placeholder, ``description``, ``[SEG]`` (random variant with
    ``rng``, the first otherwise)."""
    tpl = rng.choice(ILVC_ANSWER_TEMPLATES) if rng is not None else ILVC_ANSWER_TEMPLATES[0]
    return tpl.format(region=REGION_TOKEN, description=description)


def multi_question(exprs: list[str], rng: random.Random | None = None) -> str:
    """One question asking for every expression of ``exprs`` (random template when ``rng`` is given)."""
    names = [clean_expression(e) for e in exprs]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    tpl = rng.choice(MULTI_QUESTION_TEMPLATES) if rng is not None else VAL_MULTI_QUESTION
    return tpl.format(exprs=joined)


def multi_answer(exprs: list[str], rejects: list[bool]) -> str:
    """``"Sure, e1: [SEG], e2: [REJ]."``: one slot per expression, in order."""
    slots = [f"{clean_expression(e)}: {'[REJ]' if r else '[SEG]'}" for e, r in zip(exprs, rejects)]
    return "Sure, " + ", ".join(slots) + "."


def build_turns(
    expressions: list[str],
    *,
    use_depth: bool,
    use_mm_start_end: bool,
    pack: bool,
    rng: random.Random | None = None,
    with_answer: bool = True,
    order: str = PROMPT_ORDERS[0],
    boxes: list[str] | None = None,
    rejects: list[bool] | None = None,
    exprs_per_question: int = 1,
    ilvc_answers: list[str | None] | None = None,
) -> list[list[tuple[str, str | None]]]:
    """Conversations for one scene.

    ``pack=False`` (the paper): one single-turn conversation per expression, each with the visual
    placeholders. ``pack=True``: one multi-turn conversation, visual placeholders once (in the first
    turn), one ``[SEG]`` per turn. ``order``: the placeholders before the question (``image_first``) or
    after it (``expression_first``). ``boxes``: one ``[x0, y0, x1, y1]`` text per expression, stated by
    the answer before its ``[SEG]`` (``answer_box`` models). ``rejects``: per expression, True where it
    names no object (its slot is ``[REJ]``; GRES models, whose fixed answer is the bare slot). ``exprs_per_question`` > 1: consecutive
    expressions share one question and one answer with a slot each (:func:`multi_answer`). ``ilvc_answers``:
    per expression, its ILVC answer (:func:`ilvc_answer`) or None; the plain answer is drawn either way, so
    the questions drawn after it stay those of a run without ILVC.
    Returns a list of conversations, each a list of (question, answer) turns.
    """
    if order not in PROMPT_ORDERS:
        raise ValueError(f"prompt order {order!r}: expected one of {PROMPT_ORDERS}")
    if boxes is not None and len(boxes) != len(expressions):
        raise ValueError(f"{len(boxes)} boxes for {len(expressions)} expressions")
    if rejects is not None and len(rejects) != len(expressions):
        raise ValueError(f"{len(rejects)} target flags for {len(expressions)} expressions")
    if exprs_per_question < 1:
        raise ValueError(f"exprs_per_question must be >= 1, got {exprs_per_question}")
    if exprs_per_question > 1 and boxes is not None:
        raise ValueError("answer_box answers state one box before one [SEG]: use one expression per question")
    if ilvc_answers is not None and any(d is not None for d in ilvc_answers):
        if len(ilvc_answers) != len(expressions):
            raise ValueError(f"{len(ilvc_answers)} ILVC answers for {len(expressions)} expressions")
        if exprs_per_question > 1 or boxes is not None:
            raise ValueError(
                "ILVC answers hold one expression's [SEG] pair: not with boxes or several per question"
            )
    ilvc_answers = ilvc_answers or [None] * len(expressions)
    gres = rejects is not None
    rejects = [False] * len(expressions) if rejects is None else [bool(r) for r in rejects]
    prefix = visual_prefix(use_depth, use_mm_start_end)
    turns = []
    # A GRES model's fixed (validation) answer is the bare slot, "[SEG]." or "[REJ].": any words before it
    # would differ between the two and hand a teacher-forced model its decision.
    bare = rng is None and gres and boxes is None
    if exprs_per_question == 1:
        for k, e in enumerate(expressions):  # question then answer per expression: the rng's draw order
            q = question(e, rng)
            box = None if boxes is None else boxes[k]
            a = BARE_ANSWERS[rejects[k]] if bare else answer(rng, box, rejects[k])
            if ilvc_answers[k] is not None and not rejects[k]:
                a = ilvc_answers[k]
            turns.append((q, a if with_answer else None))
    else:
        for start in range(0, len(expressions), exprs_per_question):
            chunk = expressions[start : start + exprs_per_question]
            q = multi_question(chunk, rng)
            a = multi_answer(chunk, rejects[start : start + exprs_per_question])
            turns.append((q, a if with_answer else None))

    return place_visual(turns, prefix, order, pack)


def place_visual(
    turns: list[tuple[str, str | None]], prefix: str, order: str, pack: bool
) -> list[list[tuple[str, str | None]]]:
    """Conversations of ``turns`` with the visual placeholders ``prefix`` before each question
    (``image_first``) or after it (``expression_first``): one conversation per turn, or with ``pack`` one
    multi-turn conversation whose first question alone carries them."""

    def visual(q: str) -> str:
        return prefix + q if order == "image_first" else q + "\n" + prefix.rstrip("\n")

    if pack:
        first_q, first_a = turns[0]
        return [[(visual(first_q), first_a), *turns[1:]]]
    return [[(visual(q), a)] for q, a in turns]


def task_question(task: str, expr: str, rng: random.Random | None, is_sentence: bool = False) -> str:
    """The question of one mask of ``task`` (``sem_seg``: a class name; ``reason_seg``: a query, asked as
    it is when ``is_sentence``); random template with ``rng``, the first one otherwise."""
    if task == "sem_seg":
        templates = SEM_SEG_QUESTION_TEMPLATES
    elif task == "reason_seg":
        templates = REASON_SENTENCE_TEMPLATES if is_sentence else REASON_PHRASE_TEMPLATES
    else:
        raise ValueError(f"task {task!r} has no mask questions of its own")
    text = " ".join(expr.strip().split()) if is_sentence else clean_expression(expr)
    if not text:
        raise ValueError("empty reasoning query")
    return (rng.choice(templates) if rng is not None else templates[0]).format(expr=text)


def build_task_turns(
    item: dict,
    *,
    use_depth: bool,
    use_mm_start_end: bool,
    pack: bool,
    rng: random.Random | None = None,
    with_answer: bool = True,
    order: str = PROMPT_ORDERS[0],
    explanatory: float = -1.0,
) -> tuple[list[list[tuple[str, str | None]]], list[bool]]:
    """Conversations of an item of ``sem_seg``, ``reason_seg`` or ``vqa`` (:mod:`dataset.tasks.base`), and
    per mask whether its answer still asks for it.

    ``sem_seg`` / ``reason_seg``: a question per mask, answered with one ``[SEG]``. A reasoning item with
    an explanation (``explanations``), in training (``rng``) and with ``explanatory`` >= 0: with
    probability ``explanatory`` the answer is the explanation alone (no ``[SEG]``: that mask is dropped),
    else ``[SEG]`` followed by the explanation or not, evenly (LISA's mix). ``vqa``: the item's ``turns``
    as one conversation, the visual placeholders in the first question, every answer supervised.
    """
    task = item["task"]
    prefix = visual_prefix(use_depth, use_mm_start_end)
    if task == "vqa":
        turns = [(q, a if with_answer else None) for q, a in item["turns"]]
        return place_visual(turns, prefix, order, pack=True), []
    flags = item.get("is_sentence") or [False] * len(item["sentences"])
    notes = item.get("explanations") or [None] * len(item["sentences"])
    turns, keep = [], []
    for expr, is_sentence, note in zip(item["sentences"], flags, notes):
        q = task_question(task, expr, rng, bool(is_sentence))
        a, kept = answer(rng), True
        if note and rng is not None and explanatory >= 0:
            if rng.random() < explanatory:
                a, kept = note, False
            elif rng.random() < 0.5:
                a = EXPLAINED_ANSWER.format(explanation=note)
        turns.append((q, a if with_answer else None))
        keep.append(kept)
    return place_visual(turns, prefix, order, pack), keep
