"""Object hallucination on light fields, in POPE's recipe: yes/no questions answered by a merged model.

The questions are :mod:`dataset.pope`'s (per scene of a split, ``k`` present categories and ``k`` absent ones
drawn ``random`` / ``popular`` / ``adversarial``). A merged model (``--version``) answers each on its own
light-field scene, with its own inputs (CAAM views, depth tokens: what its config says), through
:class:`training.serve.predict.Segmenter`'s sample pipeline: one single-turn conversation per question, the
visual placeholders in each, greedy generation of ``--max_new_tokens`` (default here 8) tokens. A question
asked in several samplings (every "yes" one, some "no" ones) is generated once.

The answer's first word decides (:func:`parse_answer`): "yes" / "no" (any case, punctuation dropped), else
*unparsed*. Metrics per sampling (:func:`pope_metrics`, positive = "yes"): accuracy (an unparsed answer is
wrong), precision, recall (an unparsed answer to a present object is a miss), F1, yes-ratio (share of
"yes" answers among all questions) and the unparsed count. Outputs in ``--out``: ``pope.json`` (options,
metrics, every question with its answer), ``pope.png`` (accuracy and F1 per sampling) and a printed table.
``scripts/pope_eval.py`` is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from dataset.collate import encode_conversation
from dataset.errors import DataError
from dataset.pope import SAMPLINGS, STYLES, PopeQuestion, load_pope_questions, question_text
from dataset.prompts import place_visual, visual_prefix
from dataset.single_scene import SceneQuery
from model.options import GenerationOptions
from training.serve.predict import Segmenter, ServeConfig, add_segmenter_flags, parse_serve
from utils.conversation import render_segments
from utils.options import add_option_flags, at_least, option, options_from_args, problems
from utils.visualize import FONT, font_scale, legend_band, text_band, wrap_text, write_png

#: Tokens generated per answer unless ``--max_new_tokens`` is given (the first word decides).
POPE_NEW_TOKENS = 8
METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass(frozen=True)
class PopeOptions:
    """The evaluation's own options (the model's come from :func:`add_segmenter_flags`)."""

    dataset_dir: str = option("./dataset", "root of refer_seg/<ds>/ and lf/<ds>/")
    ds: str = option("ref-urbanlf-syn", "the light-field dataset (refer_seg/<ds>/ with instances.json)")
    split: str = option("val", "split (or subset tag) whose scenes are asked about")
    k: int = option(3, "present and absent categories asked per scene and sampling", check=at_least(1))
    seed: int = option(0, "seed of the random draws (present categories, random sampling)")
    style: str = option("pope", "question wording", choices=tuple(STYLES))
    batch_size: int = option(4, "scenes per forward (all their questions together)", check=at_least(1))
    out: str = option("runs/pope", "output folder: pope.json, pope.png")

    def __post_init__(self) -> None:
        found = problems(self)
        if found:
            raise ValueError("; ".join(found))


def parse_answer(text: str) -> str:
    """``"yes"`` / ``"no"`` when the answer's first word is one (any case, punctuation around it dropped:
    "Yes." and "no, there is not" count), else ``"unparsed"`` ("Sure", "", "[SEG]")."""
    match = re.match(r"\s*([A-Za-z]+)\b", text)
    word = match.group(1).lower() if match else ""
    return word if word in ("yes", "no") else "unparsed"


def pope_metrics(labels: Sequence[str], answers: Sequence[str]) -> dict[str, float | int]:
    """POPE's metrics of parsed ``answers`` (``yes`` / ``no`` / ``unparsed``) against ``labels`` (``yes`` /
    ``no``), positive = ``yes``. An unparsed answer is neither positive nor a correct "no": it counts in
    every denominator, lowers accuracy, and is a miss (false negative) for a present object.

    Returns ``n, tp, fp, tn, fn, unparsed`` (counts; ``fn`` includes unparsed "yes" questions) and
    ``accuracy, precision, recall, f1, yes_ratio`` in [0, 1] (precision 0 without any "yes" answer)."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels for {len(answers)} answers")
    bad = sorted({a for a in answers if a not in ("yes", "no", "unparsed")} | set(labels) - {"yes", "no"})
    if bad:
        raise ValueError(f"labels must be yes/no and answers yes/no/unparsed, got {bad}")
    pairs = list(zip(labels, answers))
    tp = sum(lab == "yes" and a == "yes" for lab, a in pairs)
    fp = sum(lab == "no" and a == "yes" for lab, a in pairs)
    tn = sum(lab == "no" and a == "no" for lab, a in pairs)
    positives, n = sum(lab == "yes" for lab in labels), len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": positives - tp,
        "unparsed": sum(a == "unparsed" for a in answers),
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


def score(
    questions: Sequence[PopeQuestion], answers: Mapping[tuple[str, int, str], str]
) -> dict[str, dict[str, float | int]]:
    """:func:`pope_metrics` per sampling (in :data:`SAMPLINGS` order), each question's answer text looked up
    by :attr:`PopeQuestion.key`."""
    out = {}
    for sampling in [s for s in SAMPLINGS if any(q.sampling == s for q in questions)]:
        asked = [q for q in questions if q.sampling == sampling]
        out[sampling] = pope_metrics([q.label for q in asked], [parse_answer(answers[q.key]) for q in asked])
    return out


def scene_sample(seg: Segmenter, scene_dir: Path, texts: Sequence[str]) -> dict[str, Any]:
    """The model-ready sample of ``scene_dir`` (:class:`utils.batch.Sample`: ``clip_center`` (3, S, S) uint8,
    the CAAM neighbours ``clip_views`` / ``sam_views`` (V, 3, ., .) and disparities as the model's config
    asks, as chat reads them) with ``conversations``: one single-turn (input_ids, labels) per question of
    ``texts`` (N), the visual placeholders expanded, each ending at the answer prefix. Raises ``DataError``
    naming the scene when a prompt leaves the model no room for ``max_new_tokens``."""
    sample = seg.dataset([SceneQuery(scene_dir, (texts[0],))])[0]
    spec = seg.spec
    prefix = visual_prefix(spec.use_depth, spec.use_mm_start_end)
    convs = place_visual([(t, None) for t in texts], prefix, spec.prompt_order, pack=False)
    encoded = [
        encode_conversation(seg.tokenizer, render_segments(spec.conv_type, c), seg.tokens) for c in convs
    ]
    limit = spec.max_positions
    for ids, _ in encoded:
        if limit and len(ids) + seg.max_new_tokens > limit:
            raise DataError(
                scene_dir,
                f"a POPE prompt of {len(ids)} tokens + {seg.max_new_tokens} to generate exceeds the model's "
                f"{limit} positions: lower --max_new_tokens",
            )
    k = len(texts)
    return {
        **sample,
        "conversations": encoded,
        "sentences": list(texts),
        "subsets": [()] * k,
        "no_target": [False] * k,
    }


def answer_questions(
    seg: Segmenter, questions: Sequence[PopeQuestion], opts: PopeOptions
) -> dict[tuple[str, int, str], str]:
    """The generated answer text of every distinct question (:attr:`PopeQuestion.key`), ``opts.batch_size``
    scenes (all their questions) per generation; scene folders follow ``--lf_dir_pattern`` under
    ``opts.dataset_dir`` (``lf/<ds>/Image<id>`` by default)."""
    by_scene: dict[tuple[str, int], list[str]] = {}
    for q in questions:
        cats = by_scene.setdefault((q.ds, q.image_id), [])
        if q.category not in cats:
            cats.append(q.category)
    scenes = list(by_scene.items())
    answers: dict[tuple[str, int, str], str] = {}
    total = sum(len(cats) for _, cats in scenes)
    with tqdm(total=total, desc="pope", unit="question", dynamic_ncols=True) as bar:
        for start in range(0, len(scenes), opts.batch_size):
            chunk = scenes[start : start + opts.batch_size]
            samples = []
            for (ds, image_id), cats in chunk:
                root, pattern = seg.data.scene_root_and_pattern(ds)  # --lf_dir_pattern
                scene_dir = Path(opts.dataset_dir) / root / pattern.format(image_id=image_id)
                samples.append(scene_sample(seg, scene_dir, [question_text(c, opts.style) for c in cats]))
            _, generated = seg.answer_batch(samples)
            for ((ds, image_id), cats), results in zip(chunk, generated, strict=True):
                for category, result in zip(cats, results, strict=True):
                    answers[(ds, image_id, category)] = result.text
                bar.update(len(cats))
    return answers


# ---------------------------------------------------------------------------------------------- report
COLOURS = {"accuracy": (46, 110, 200), "f1": (230, 140, 40)}
PAPER = (252, 252, 252)


def bar_plot(
    metrics: Mapping[str, Mapping[str, float]], title: str, width: int = 900, height: int = 560
) -> np.ndarray:
    """Accuracy and F1 bars per sampling on a 0..1 axis, the value above each bar, a dashed line at 0.5
    (chance on a 50/50 set), each sampling's n, yes-ratio and unparsed count under it, a title band and a
    legend. Returns (H, W, 3) uint8 RGB, W = ``width``."""
    left, right, top, bottom = 70, 20, 30, 80
    panel = np.full((height, width, 3), PAPER, np.uint8)
    x0, y0, plot_h = left, height - bottom, height - top - bottom
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 - round(t * plot_h)
        cv2.line(panel, (x0, y), (width - right, y), (222, 222, 222), 1)
        cv2.putText(panel, f"{t:.2f}", (8, y + 7), FONT, 0.6, (40, 40, 40), 1, cv2.LINE_AA)
    chance = y0 - plot_h // 2
    for x in range(x0, width - right, 16):
        cv2.line(panel, (x, chance), (min(x + 8, width - right), chance), (120, 120, 120), 1)
    cv2.line(panel, (x0, top), (x0, y0), (40, 40, 40), 2)
    cv2.line(panel, (x0, y0), (width - right, y0), (40, 40, 40), 2)
    group = (width - left - right) / max(len(metrics), 1)
    bar = int(group * 0.3)
    for g, (sampling, values) in enumerate(metrics.items()):
        centre = x0 + group * (g + 0.5)
        for b, (name, colour) in enumerate(COLOURS.items()):
            value = float(np.clip(values[name], 0.0, 1.0))
            xa = int(centre - bar + b * bar)
            cv2.rectangle(panel, (xa + 3, y0 - round(value * plot_h)), (xa + bar - 3, y0), colour, -1)
            label = f"{value:.3f}"
            tw = cv2.getTextSize(label, FONT, 0.55, 1)[0][0]
            ty = max(y0 - round(value * plot_h) - 8, top + 14)
            cv2.putText(panel, label, (xa + (bar - tw) // 2, ty), FONT, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
        name = f"{sampling} (n={values.get('n', '?')})"
        tw = cv2.getTextSize(name, FONT, 0.7, 2)[0][0]
        cv2.putText(panel, name, (int(centre - tw / 2), y0 + 30), FONT, 0.7, (20, 20, 20), 2, cv2.LINE_AA)
        note = f"yes {values.get('yes_ratio', 0.0):.2f}, unparsed {values.get('unparsed', 0)}"
        tw = cv2.getTextSize(note, FONT, 0.55, 1)[0][0]
        cv2.putText(panel, note, (int(centre - tw / 2), y0 + 56), FONT, 0.55, (60, 60, 60), 1, cv2.LINE_AA)
    legend = legend_band(
        [
            (COLOURS["accuracy"], "accuracy"),
            (COLOURS["f1"], "F1 (positive = yes)"),
            (None, "- - - chance (0.5)"),
        ],
        width,
    )
    head = text_band(wrap_text(title, width - 16, font_scale(width)), width)
    return np.concatenate([head, legend, panel], axis=0)


def table(metrics: Mapping[str, Mapping[str, float | int]]) -> str:
    """The metrics as a fixed-width text table, one row per sampling."""
    head = (
        f"{'sampling':<12} {'n':>5} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'yes':>6} {'unparsed':>8}"
    )
    rows = [head]
    for sampling, m in metrics.items():
        rows.append(
            f"{sampling:<12} {m['n']:>5} {m['accuracy']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} "
            f"{m['f1']:6.3f} {m['yes_ratio']:6.3f} {m['unparsed']:>8}"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line: the evaluation's options and a :class:`Segmenter`'s (``--version`` required)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_option_flags(parser.add_argument_group("POPE"), PopeOptions)
    add_segmenter_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[PopeOptions, ServeConfig]:
    """The evaluation's options and the model's; ``--max_new_tokens`` defaults to :data:`POPE_NEW_TOKENS`."""
    parser = build_parser()
    args, serve = parse_serve(parser, argv)
    try:
        opts = options_from_args(PopeOptions, args)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = serve.config
    if "max_new_tokens" not in cfg.given_fields(GenerationOptions):
        generation = dataclasses.replace(cfg.generation, max_new_tokens=POPE_NEW_TOKENS)
        serve = dataclasses.replace(serve, config=cfg.replace(generation=generation))
    return opts, serve


def run_pope(opts: PopeOptions, serve: ServeConfig) -> dict[str, Any]:
    """Ask, score and write ``pope.json`` + ``pope.png`` in ``opts.out``; returns the report
    (``options``, ``version``, ``metrics`` {sampling: ...}, ``questions`` [...])."""
    questions = load_pope_questions(opts.dataset_dir, opts.ds, opts.split, k=opts.k, seed=opts.seed)
    seg = Segmenter(serve)
    answers = answer_questions(seg, questions, opts)
    metrics = score(questions, answers)
    records = [
        {
            **dataclasses.asdict(q),
            "question": question_text(q.category, opts.style),
            "answer": answers[q.key],
            "parsed": parse_answer(answers[q.key]),
        }
        for q in questions
    ]
    report = {
        "options": dataclasses.asdict(opts),
        "version": str(serve.config.run.version),
        "max_new_tokens": seg.max_new_tokens,
        "metrics": metrics,
        "questions": records,
    }
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pope.json").write_text(json.dumps(report, indent=2))
    title = (
        f"POPE on {opts.ds} {opts.split} ({opts.style} wording): {Path(str(serve.config.run.version)).name}"
    )
    write_png(out / "pope.png", bar_plot(metrics, title))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints the table and where the report went; returns the exit status (1 on bad input)."""
    opts, serve = parse_args(argv)
    try:
        report = run_pope(opts, serve)
    except (DataError, ValueError, OSError) as exc:  # bad input: one message naming the file or flag
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(report["metrics"]))
    print(f"report: {Path(opts.out) / 'pope.json'}, plot: {Path(opts.out) / 'pope.png'}")
    return 0
