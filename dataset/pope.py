"""POPE's object-hallucination questions on a light-field dataset: "Is there a <category> in the image?".

POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023) asks yes/no
questions about objects: per image, ``k`` objects that are there ("Yes") and ``k`` that are not ("No"), the
absent ones drawn three ways:

* ``random``: uniformly among the categories absent from the scene;
* ``popular``: the absent categories most frequent over the dataset (scenes holding one, every split);
* ``adversarial``: the absent categories that co-occur most often with the scene's present ones (summed over
  the present categories: number of scenes holding both, every split).

Here an object is a category of the dataset's ``instances.json`` (one question per category, not per
instance). A category is *present* in a scene when one of its annotations covers a pixel of the centre view
(:meth:`ReferAnnotations.empty_mask_problem`), *absent* when the scene has no annotation of it at all; a
category annotated with an empty mask is neither, and never asked. The scenes are those with a ref in the
split (as :class:`dataset.scenes.SceneDataset` selects them).

Per scene and sampling, ``n = min(k, #present, #absent)`` present categories (the same ones in all three
samplings, drawn with the scene's own generator) and ``n`` absent ones: every sampling is exactly 50/50.
Ties in the popular and adversarial rankings are broken by the category order of ``instances.json``, so
the set depends on ``seed`` only through the random draws. The questions' wording is :data:`STYLES`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataset.errors import AnnotationError
from dataset.refer import ReferAnnotations
from dataset.synthetic.task_texts import A_NOUN

SAMPLINGS: tuple[str, ...] = ("random", "popular", "adversarial")
"""POPE's three ways of choosing the absent categories (see the module docstring)."""
STYLES: dict[str, str] = {
    "pope": "Is there {a_noun} in the image?",
    "lightfield": "Given the light field and its disparity map, is there {a_noun} in the image?",
    "scene": "Is there {a_noun} in the scene?",
}
"""Question wordings: POPE's own, one naming the light field's disparity, and the generator's VQA wording
(:mod:`dataset.synthetic.tasks`, what a model trained on the VQA mix has seen)."""
LABELS: tuple[str, ...] = ("yes", "no")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: scene ``image_id`` of dataset ``ds``, the ``category`` asked about, the true
    ``label`` (``"yes"``: present, ``"no"``: absent) and the ``sampling`` it belongs to."""

    image_id: int
    ds: str
    category: str
    label: str
    sampling: str

    @property
    def key(self) -> tuple[str, int, str]:
        """What the answer depends on: the same question in two samplings is asked once."""
        return (self.ds, self.image_id, self.category)


@dataclass(frozen=True)
class DatasetObjects:
    """The categories of a dataset and, per scene (image id), the ones present (a visible annotation) and
    the ones annotated at all (present or with an empty mask)."""

    categories: tuple[str, ...]
    present: Mapping[int, frozenset[str]]
    annotated: Mapping[int, frozenset[str]]

    def frequency(self) -> Counter[str]:
        """Scenes holding each category (every scene of the dataset)."""
        return Counter(c for cats in self.present.values() for c in cats)

    def co_occurrence(self) -> dict[str, Counter[str]]:
        """``[a][b]``: scenes where both ``a`` and ``b`` are present (``a != b``)."""
        out: dict[str, Counter[str]] = {c: Counter() for c in self.categories}
        for cats in self.present.values():
            for a in cats:
                out.setdefault(a, Counter()).update(b for b in cats if b != a)
        return out


def a_noun(category: str) -> str:
    """The category with its article: the generator's (``"vegetation"``, ``"a traffic sign"``), else
    ``"an"`` before a vowel and ``"a"`` otherwise."""
    if category in A_NOUN:
        return A_NOUN[category]
    return f"{'an' if category[:1].lower() in 'aeiou' else 'a'} {category}"


def question_text(category: str, style: str = "pope") -> str:
    """The question about ``category`` in wording ``style`` (a key of :data:`STYLES`)."""
    if style not in STYLES:
        raise ValueError(f"question style {style!r}: expected one of {', '.join(STYLES)}")
    return STYLES[style].format(a_noun=a_noun(category))


def dataset_objects(ann: ReferAnnotations) -> DatasetObjects:
    """Every scene's present and annotated categories, from ``ann``'s ``instances.json``.

    Raises ``AnnotationError`` naming that file when it has no annotations (POPE needs the objects)."""
    path = Path(ann.instances_path)
    instances = json.loads(path.read_text(encoding="utf-8"))  # already validated by ReferAnnotations.load
    records = instances.get("annotations") or []
    if not records:
        raise AnnotationError(
            path, "no annotations: POPE asks about the objects of each scene, and this dataset lists none"
        )
    listed = [ann.category_name(c["id"]) for c in instances.get("categories") or []]
    present: dict[int, set[str]] = {int(i["id"]): set() for i in instances.get("images") or []}
    annotated: dict[int, set[str]] = {i: set() for i in present}
    for record in records:
        image_id, name = int(record["image_id"]), ann.category_name(record["category_id"])
        annotated.setdefault(image_id, set()).add(name)
        if ann.empty_mask_problem(record["id"]) is None:
            present.setdefault(image_id, set()).add(name)
    seen = [c for cats in annotated.values() for c in sorted(cats)]
    return DatasetObjects(
        categories=tuple(dict.fromkeys([*listed, *seen])),
        present={i: frozenset(c) for i, c in present.items()},
        annotated={i: frozenset(c) for i, c in annotated.items()},
    )


def _ranked(candidates: Sequence[str], score: Mapping[str, int], order: Sequence[str]) -> list[str]:
    """``candidates`` by decreasing ``score``, ties in ``order``'s order."""
    position = {c: i for i, c in enumerate(order)}
    return sorted(candidates, key=lambda c: (-score.get(c, 0), position.get(c, len(position))))


def absent_choices(
    objects: DatasetObjects,
    image_id: int,
    n: int,
    sampling: str,
    rng: random.Random,
    stats: tuple[Counter[str], dict[str, Counter[str]]] | None = None,
) -> list[str]:
    """``n`` categories absent from scene ``image_id``, chosen as ``sampling`` says (module docstring).
    ``stats``: the dataset's (frequency, co-occurrence), computed here when not given."""
    order = objects.categories
    absent = [c for c in order if c not in objects.annotated.get(image_id, frozenset())]
    if sampling == "random":
        return rng.sample(absent, n)
    frequency, co = stats or (objects.frequency(), objects.co_occurrence())
    if sampling == "popular":
        return _ranked(absent, frequency, order)[:n]
    if sampling == "adversarial":
        present = objects.present.get(image_id, frozenset())
        together = Counter({c: sum(co.get(p, Counter())[c] for p in present) for c in absent})
        return _ranked(absent, together, order)[:n]
    raise ValueError(f"sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")


def pope_questions(
    objects: DatasetObjects,
    image_ids: Sequence[int],
    *,
    ds: str,
    k: int = 3,
    seed: int = 0,
    samplings: Sequence[str] = SAMPLINGS,
) -> list[PopeQuestion]:
    """POPE's questions on the scenes ``image_ids``: per scene and sampling ``n = min(k, #present,
    #absent)`` "yes" questions (the same present categories in every sampling) then ``n`` "no" ones.

    Deterministic: scene ``i``'s present categories come from ``random.Random(f"{seed}/{ds}/{i}")`` and
    its random absent ones from ``random.Random(f"{seed}/{ds}/{i}/random")``, whatever the other scenes. Returns the records scene by
    scene, in ``samplings`` order."""
    if k < 1:
        raise ValueError(f"k (questions of each label per scene) must be >= 1, got {k}")
    unknown = [s for s in samplings if s not in SAMPLINGS]
    if unknown or not samplings:
        raise ValueError(f"samplings {list(samplings)}: expected some of {', '.join(SAMPLINGS)}")
    stats = (objects.frequency(), objects.co_occurrence())
    out: list[PopeQuestion] = []
    for image_id in image_ids:
        present = [c for c in objects.categories if c in objects.present.get(image_id, frozenset())]
        absent = [c for c in objects.categories if c not in objects.annotated.get(image_id, frozenset())]
        n = min(k, len(present), len(absent))
        if n == 0:
            continue
        yes = random.Random(f"{seed}/{ds}/{image_id}").sample(present, n)
        for sampling in samplings:
            rng = random.Random(f"{seed}/{ds}/{image_id}/{sampling}")
            no = absent_choices(objects, image_id, n, sampling, rng, stats)
            out += [PopeQuestion(image_id, ds, c, "yes", sampling) for c in yes]
            out += [PopeQuestion(image_id, ds, c, "no", sampling) for c in no]
    return out


def split_scenes(ann: ReferAnnotations, split: str) -> list[int]:
    """Image ids of the scenes with a ref in ``split``, ascending. Raises ``ValueError`` naming ``--split``
    and the refs file, with the selectors it has, when none."""
    image_ids = sorted({ref.image_id for ref in ann.refs_for(split)})
    if not image_ids:
        have = ", ".join(ann.selectors_present()) or "none"
        raise ValueError(f"--split {split!r}: no refs of that split in {ann.refs_path} (it has: {have})")
    return image_ids


def load_pope_questions(
    dataset_dir: str | Path,
    ds: str,
    split: str,
    *,
    k: int = 3,
    seed: int = 0,
    samplings: Sequence[str] = SAMPLINGS,
) -> list[PopeQuestion]:
    """:func:`pope_questions` on the scenes of ``split`` of ``<dataset_dir>/refer_seg/<ds>``.

    Raises ``AnnotationError`` naming the file when the refs or ``instances.json`` are missing, malformed or
    without annotations; ``ValueError`` when the split has no scenes or no scene can be asked about."""
    ann = ReferAnnotations.load(dataset_dir, ds)
    image_ids = split_scenes(ann, split)
    questions = pope_questions(dataset_objects(ann), image_ids, ds=ds, k=k, seed=seed, samplings=samplings)
    if not questions:
        raise ValueError(
            f"--split {split!r} of {ann.instances_path}: no scene has both a visible object and an absent "
            "category, so POPE has nothing to ask"
        )
    return questions
