"""Chat templates (llava_v1, llava_llama_2) rendered as segments so labels can be masked exactly.

A conversation is rendered into a list of ``(text, is_answer)`` segments. Tokenising segment by segment
(instead of tokenising the whole string and searching for the answer afterwards) makes the answer
boundaries exact whatever the tokenizer merges, which is what label masking needs.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_ORDERS: tuple[str, ...] = ("image_first", "expression_first")
"""Where a question's visual placeholders go: before the request (LLaVA's order) or after it."""

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class ChatTemplate:
    """How a multi-turn conversation becomes text.

    ``first_user`` / ``next_user`` wrap a question (``{system}`` and ``{q}`` are filled in); ``assistant``
    wraps an answer, and ``eos`` closes every answer (it belongs to the answer, so it carries loss).
    ``generation_prompt`` is the question suffix that asks the model to answer.
    """

    name: str
    first_user: str
    next_user: str
    answer_prefix: str
    eos: str


TEMPLATES: dict[str, ChatTemplate] = {
    "llava_v1": ChatTemplate(
        name="llava_v1",
        first_user="{system} USER: {q}",
        next_user="USER: {q}",
        answer_prefix=" ASSISTANT:",
        eos="</s>",
    ),
    "llava_llama_2": ChatTemplate(
        name="llava_llama_2",
        first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q}",
        next_user="<s>[INST] {q}",
        answer_prefix=" [/INST]",
        eos=" </s>",
    ),
}


def get_template(name: str) -> ChatTemplate:
    """Return the template registered as ``name`` (``llava_v1`` or ``llava_llama_2``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conv_type {name!r}; choose one of {sorted(TEMPLATES)}") from None


def render_segments(
    template: ChatTemplate | str,
    turns: list[tuple[str, str | None]],
    system: str = SYSTEM_PROMPT,
) -> list[tuple[str, bool]]:
    """Render ``turns`` [(question, answer or None)] into ``(text, is_answer)`` segments.

    The last turn may have ``answer=None``: the rendering then ends with the answer prefix, ready for
    generation. Answers are ``" " + answer + eos``.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    segments: list[tuple[str, bool]] = []
    for i, (question, answer) in enumerate(turns):
        user = tpl.first_user if i == 0 else tpl.next_user
        segments.append((user.format(system=system, q=question) + tpl.answer_prefix, False))
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may be left unanswered")
            break
        segments.append((" " + answer + tpl.eos, True))
    return segments
