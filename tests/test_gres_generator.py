"""The generator's GRES expressions: each true by construction (plural sets are exactly their members, an
absent attribute matches nothing, a false depth relation is the reverse of the scene's), written in
gRefCOCO's form beside the unchanged one-target refs, read back through the same reader and scene dataset,
with a no-target share near gRefCOCO's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataset.refer import ReferAnnotations
from dataset.scenes import SceneDataset
from dataset.synthetic import SyntheticConfig, write_dataset
from dataset.synthetic.cli import format_summary
from dataset.synthetic.expressions import DEPTH_MARGIN
from dataset.synthetic.generator import render_scene
from dataset.synthetic.gres import PLURALS, absent_attribute, false_relation, multi_target
from utils.gres_metrics import GRES_TAGS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CFG = dict(height=64, width=96, num_train=24, num_val=16, seed=5)


def _named(universe: list, phrase: str) -> list:
    """The objects a phrase ("vehicle", "red vehicle") describes."""
    return [o for o in universe if phrase in (o.category, f"{o.colour} {o.category}")]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("gres")
    summary = write_dataset(root, SyntheticConfig(**CFG, gres=True, ds_name="g"))
    write_dataset(root, SyntheticConfig(**CFG, ds_name="p"))
    return root, summary


def test_every_gres_expression_is_true_in_its_scene() -> None:
    cfg = SyntheticConfig(**CFG)
    seen = {"multi": 0, "absent": 0, "depth": 0}
    for image_id in range(1, 25):
        scene = render_scene(image_id, cfg, views=[(cfg.centre, cfg.centre)])
        universe = [o for o in scene.objects if o.area > 0]
        by_index = {o.index: o for o in universe}
        for e in multi_target(universe):
            seen["multi"] += 1
            assert len(e.targets) >= 2
            m = re.fullmatch(r"(?:all )?the (?:(\w+) )?([a-z ]+)", e.sentence)
            if "front" in e.tags:  # every target nearer than the reference object by the margin
                continue
            colour, noun = m.group(1), m.group(2)
            if colour not in (None, *{o.colour for o in universe}):  # "traffic signs": no colour word
                colour, noun = None, f"{m.group(1)} {noun}"
            category = next(c for c, p in PLURALS.items() if p == noun)
            want = {o.index for o in universe if o.category == category and colour in (None, o.colour)}
            assert set(e.targets) == want, e.sentence
        for e in absent_attribute(universe, np.random.default_rng(0)):
            seen["absent"] += 1
            assert e.targets == () and "no-target" in e.tags
            words = e.sentence[len("the ") :]
            assert not any(words in (o.category, f"{o.colour} {o.category}") for o in universe), e.sentence
        for e in false_relation(universe):
            seen["depth"] += 1
            assert e.targets == () and "nt-depth" in e.tags
            d_phrase, rel, y_phrase = re.fullmatch(
                r"the (.+) (behind|in front of) the (.+)", e.sentence
            ).groups()
            (t,), (y,) = _named(universe, d_phrase), _named(universe, y_phrase)  # each names one object
            gap = by_index[t.index].disparity - by_index[y.index].disparity
            assert (gap >= DEPTH_MARGIN) if rel == "behind" else (gap <= -DEPTH_MARGIN), e.sentence
    assert all(seen.values()), seen


def test_written_beside_the_unchanged_refs(written) -> None:
    root, summary = written
    gres = json.loads((root / "refer_seg" / "g" / "g.json").read_text())
    plain = json.loads((root / "refer_seg" / "p" / "p.json").read_text())
    assert [r for r in gres if r["ref_id"] % 100 < 50] == plain  # today's refs, untouched
    extra = [r for r in gres if r["ref_id"] % 100 >= 50]
    assert extra and all(isinstance(r["ann_id"], list) and isinstance(r["category_id"], list) for r in extra)
    for r in extra:
        assert r["no_target"] == (r["ann_id"] == [-1]) == ("no-target" in r["subsets"])
        assert set(r["subsets"]) <= {*GRES_TAGS, "front"}  # the metrics' GRES columns
    assert 0.08 <= summary["gres"]["no_target_share"] <= 0.16  # gRefCOCO: 11.6 %
    assert summary["gres"]["multi_target_share"] > 0.05
    share = 100 * summary["gres"]["no_target_share"]
    assert f"GRES: {share:.1f} % of the expressions have no target" in format_summary(summary)


def test_read_back_as_unions_and_empty_masks(written) -> None:
    root, _ = written
    ann = ReferAnnotations.load(root, "g")
    scenes = SceneDataset(root, "g", "val", mode="val", with_disparity=False)
    checked = 0
    for index in range(len(scenes)):
        item = scenes[index]
        refs = {r.ref_id: r for r in ann.refs}
        for ref_id, mask, no_target in zip(item["ref_ids"], item["masks"], item["no_target"]):
            ref = refs[ref_id]
            want = np.zeros_like(mask)
            for a in ref.ann_ids:
                want |= ann.mask(a)
            np.testing.assert_array_equal(mask, want)
            assert no_target == ref.no_target == (not mask.any())
            checked += len(ref.ann_ids) > 1 or ref.no_target
    assert checked > 0
