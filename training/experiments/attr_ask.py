"""AttrEval, asking the model (LIRA's second read-out): after its ``[SEG]`` answer, a second turn asks about
the target ("What colour is it?", "What is it?") and the generated answer is scored against
``attributes.json``.

The first turn is the evaluation's (its question and reference answer with ``[SEG]``, teacher-forced as in
``training.evaluate``); the second is generated greedily (``model.inference.generate_masks``), every
conversation of a batch together. An answer is ``exact`` when, lowercased, stripped of punctuation and of
a leading article or "it is", it *is* the attribute's value, and ``mentions`` when the value occurs in it
as a whole phrase.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.collate import collate_batch, encode_conversation, move_batch
from dataset.prompts import build_turns
from dataset.refer_seg import ReferSegDataset
from model.inference import generate_masks
from model.lfllm import LFLLMForCausalLM
from utils.conversation import render_segments

#: attribute -> the follow-up question that asks for it.
QUESTIONS: dict[str, str] = {"colour": "What colour is it?", "category": "What is it?"}
_LEAD = re.compile(r"^(?:(?:it is|it s|this is|that is) )?(?:(?:a|an|the) )?")


def normalise_answer(text: str) -> str:
    """Lowercase, special tokens / punctuation dropped, a leading "it is" / article dropped, spaces folded."""
    text = re.sub(r"<[^>]*>|\[[a-z]+\]", " ", text.lower())
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    text = " ".join(text.split())
    return _LEAD.sub("", text, count=1)


def score_answer(text: str, value: str) -> dict[str, bool]:
    """``exact``: the normalised answer is ``value``; ``mentions``: ``value`` occurs in it as a phrase."""
    answer, value = normalise_answer(text), value.lower()
    return {"exact": answer == value, "mentions": re.search(rf"\b{re.escape(value)}\b", answer) is not None}


class FollowUpDataset(ReferSegDataset):
    """The evaluation's samples with a second, unanswered turn ``question`` after each ``[SEG]`` answer:
    each conversation's prompt ends at the answer prefix of that turn, ready for generation."""

    def __init__(self, base: ReferSegDataset, question: str) -> None:
        if base.spec.answer_box or base.spec.exprs_per_question > 1:
            raise ValueError("asking about the target needs one [SEG] answer per expression, without a box")
        super().__init__(base.scenes, base.tokenizer, base.spec, base.tokens, train=False, with_answers=True)
        self.question = question

    def conversations(
        self,
        sentences: list[str],
        rng: Any,
        masks: Any = None,
        no_target: list[bool] | None = None,
        ilvc_answers: list[str | None] | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """One two-turn conversation per sentence (the second turn unanswered), tokenised; ``ilvc_answers``
        never applies (the evaluation's answers are the plain ones)."""
        spec = self.spec
        rejects = [bool(v) for v in no_target] if no_target is not None and spec.gres else None
        convs = build_turns(
            sentences,
            use_depth=spec.use_depth,
            use_mm_start_end=spec.use_mm_start_end,
            pack=False,
            rng=None,
            with_answer=True,
            order=spec.prompt_order,
            rejects=rejects,
        )
        out = []
        for conv in convs:
            ids, labels = encode_conversation(
                self.tokenizer, render_segments(spec.conv_type, [*conv, (self.question, None)]), self.tokens
            )
            self._check_positions(ids)
            out.append((ids, labels))
        return out


@torch.no_grad()
def ask_attributes(
    model: LFLLMForCausalLM,
    loader: DataLoader,
    tokenizer: Any,
    device: torch.device,
    max_new_tokens: int = 8,
) -> dict[str, list[str]]:
    """Per attribute of :data:`QUESTIONS`, the generated answer of every expression of ``loader`` (a
    :func:`training.loaders.build_val_loader` loader over a ``ReferSegDataset``), in the loader's order."""
    base = loader.dataset.dataset
    out: dict[str, list[str]] = {}
    was_training = model.training
    model.eval()
    try:
        for name, question in QUESTIONS.items():
            follow = FollowUpDataset(base, question)
            asked = DataLoader(
                follow,
                batch_size=loader.batch_size,
                shuffle=False,
                collate_fn=lambda s: collate_batch(s, tokenizer.pad_token_id),
            )
            answers = []
            for batch in tqdm(asked, desc=f"attr_eval asking {name}", dynamic_ncols=True):
                generated = generate_masks(model, move_batch(batch, device), tokenizer, max_new_tokens)
                answers += [g.text for per_image in generated for g in per_image]
            out[name] = answers
    finally:
        model.train(was_training)
    return out


def asked_figures(answers: dict[str, list[str]], truth: dict[str, list[str]]) -> dict[str, Any]:
    """Per attribute: exact and mention accuracy of ``answers`` against ``truth`` (equal-length lists), n."""
    out = {}
    for name, texts in answers.items():
        if len(texts) != len(truth[name]):
            raise ValueError(f"{name}: {len(texts)} answers for {len(truth[name])} expressions")
        scores = [score_answer(t, v) for t, v in zip(texts, truth[name])]
        n = max(len(scores), 1)
        out[name] = {
            "question": QUESTIONS.get(name, ""),
            "exact_acc": sum(s["exact"] for s in scores) / n,
            "mention_acc": sum(s["mentions"] for s in scores) / n,
            "n": len(scores),
        }
    return out
