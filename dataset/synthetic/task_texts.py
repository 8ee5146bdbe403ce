"""Wordings of the synthetic VQA and reasoning-segmentation tasks (:mod:`dataset.synthetic.tasks`).

Reasoning queries describe a target by its use or by a consequence of the scene's geometry, never by its name:
each kind has phrase-style queries ("the object nearest to the viewer", asked inside a question template) and
sentence-style ones ("If I walked straight into this scene, which object would I reach first?", asked as is).
"""

from __future__ import annotations

from typing import NamedTuple

from dataset.synthetic.shapes import CATEGORIES

OCCLUSION_WORDS: dict[str, str] = {
    "no-o": "not occluded",
    "o-1": "slightly occluded",
    "o-2": "partly occluded",
    "o-3": "heavily occluded",
}
"""The occlusion level of a ref (``no-o`` .. ``o-3``, ``dataset.synthetic.generator``) in a VQA answer."""
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SINGULAR = {c: ("patch of vegetation" if c == "vegetation" else c) for c in CATEGORIES}
"""The countable singular of each category ("There is one patch of vegetation.")."""
A_NOUN = {c: ("vegetation" if c == "vegetation" else f"a {c}") for c in CATEGORIES}
"""The category with its article ("Is there a bridge in the scene?", "Is there vegetation in the scene?")."""

DEPTH_TEXTS: dict[str, dict[bool, tuple[str, ...]]] = {
    "closest": {
        False: (
            "the thing you would reach first walking into the scene",
            "the object nearest to the viewer",
            "whatever stands closest to where the camera is",
        ),
        True: (
            "If I walked straight into this scene, which object would I reach first?",
            "If I wanted to cross safely, which object should I watch because it is nearest to me?",
            "What is the closest thing to the camera in this picture?",
        ),
    },
    "farthest": {
        False: (
            "the thing it would take longest to walk to",
            "the object farthest from the viewer",
            "the object standing deepest in the scene",
        ),
        True: (
            "If I walked to every object here, which one would I reach last?",
            "Which object in this picture is farthest away from the camera?",
            "What would take me the longest to walk to from here?",
        ),
    },
    "occluded": {  # the first of each style only when every other object is fully visible
        False: ("what is partly hidden behind something else", "the thing most hidden behind other things"),
        True: (
            "Which object can I only partly see because something nearer blocks it?",
            "What in this scene is hidden the most by the things in front of it?",
        ),
    },
}
"""Queries of the depth and occlusion kinds: ``DEPTH_TEXTS[kind][is_sentence]``."""


class Function(NamedTuple):
    """How a category's use identifies it: queries of both styles, the categories they could also fit (the
    target is asked this way only when none of them is in the scene) and why the target answers."""

    phrases: tuple[str, ...]
    sentences: tuple[str, ...]
    conflicts: tuple[str, ...]
    reason: str


FUNCTIONS: dict[str, Function] = {
    "vehicle": Function(
        ("what carries passengers along the road", "the thing someone could drive to the next town"),
        (
            "If I needed a ride to the next town, what here could take me?",
            "What in this scene runs on an engine and carries people?",
        ),
        (),
        "vehicles are driven and carry passengers along the road",
    ),
    "bike": Function(
        ("what someone could pedal to get around", "the thing with two wheels that nobody is riding"),
        (
            "If I wanted to pedal to work, what here could I use?",
            "What could I ride here without needing any fuel?",
        ),
        ("rider",),
        "a bike is pedalled to get around without a motor",
    ),
    "person": Function(
        ("the one getting around on foot", "who I could ask for directions"),
        ("If I got lost, who here could I ask for directions?", "Who in this scene is walking on foot?"),
        ("rider",),
        "a person walks on foot and could be asked for directions",
    ),
    "rider": Function(
        ("the one pedalling along on two wheels", "who is cycling through the scene"),
        (
            "Who here is cycling and might need room on the road?",
            "Which one is travelling on a bicycle right now?",
        ),
        (),
        "a rider is the one cycling on a bike",
    ),
    "pole": Function(
        ("what holds lights or cables high above the ground", "the tall post that could carry a street lamp"),
        (
            "What here could hold up a street lamp or wires?",
            "Which thing stands upright to carry lights or cables overhead?",
        ),
        ("traffic sign",),
        "poles stand upright and carry lamps or cables",
    ),
    "traffic sign": Function(
        ("what tells drivers the rules of the road", "the thing that gives road users instructions"),
        (
            "What here tells drivers what they may or may not do?",
            "Where should a driver look to learn the rules of this road?",
        ),
        (),
        "traffic signs tell road users the rules",
    ),
    "vegetation": Function(
        ("what is growing here", "the living plants that give some shade"),
        (
            "What in this scene would need watering to stay alive?",
            "Which thing here grows toward the sunlight?",
        ),
        (),
        "vegetation is the only plant life here",
    ),
    "fence": Function(
        ("what keeps people from walking through to the other side", "the barrier that marks off the area"),
        (
            "What stops people from walking straight through here?",
            "Which thing marks a boundary that I should not climb over?",
        ),
        (),
        "a fence is a barrier that marks a boundary",
    ),
    "bridge": Function(
        ("what lets traffic pass over the space below", "the structure that spans a gap overhead"),
        (
            "If I wanted to cross over without going down, what could I use?",
            "Which structure spans the gap so that people can pass above it?",
        ),
        (),
        "a bridge spans a gap so that people can cross above it",
    ),
}
"""The ``function`` kind's queries per category."""


def number(n: int) -> str:
    """``n`` in words up to ten ("no" for 0), digits beyond."""
    return NUMBERS[n] if n < len(NUMBERS) else str(n)
