"""SceneDataset over hand-built light-field and 2D fixtures: item contents, val completeness, seeded
train sampling, and the mask/view shape check."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch.utils.data
from pycocotools import mask as mask_utils

from dataset.errors import AnnotationError
from dataset.scenes import SceneDataset, split_datasets

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 12, 16
LF, TWO_D = "lfds", "coco2d"


def _rect(r0: int, r1: int, c0: int, c1: int, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(hw, np.uint8)
    mask[r0:r1, c0:c1] = 1
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# ref_id -> (image_id, split, subsets, sentences, mask)
REFS = {
    1: (1, "train", [], ["a1", "a2"], _rect(0, 2, 0, 3)),
    2: (1, "train", [], ["b1"], _rect(3, 5, 0, 3)),
    3: (1, "train", [], ["c1", "c2", "c3"], _rect(6, 8, 0, 3)),
    4: (1, "train", [], ["d1"], _rect(9, 12, 0, 3)),
    5: (2, "val", ["o-1", "closest"], ["e1", "e2", "e3"], _rect(1, 4, 5, 9)),
    6: (2, "train", [], ["f1"], _rect(5, 6, 5, 9)),
    7: (3, "val", ["behind"], ["g1"], _rect(0, 12, 15, 16)),
}


def _annotations(root: Path, ds: str, refs: dict, file_names: dict[int, str]) -> tuple[list, dict]:
    raw_refs, anns = [], []
    for ref_id, (image_id, split, subsets, sents, mask) in refs.items():
        sentences = [{"sent_id": 10 * ref_id + i, "sent": s, "tokens": [s]} for i, s in enumerate(sents)]
        raw_refs.append(
            dict(ref_id=ref_id, ann_id=100 + ref_id, image_id=image_id, category_id=1, split=split)
            | {"subsets": subsets, "sentences": sentences}
        )
        anns.append({"id": 100 + ref_id, "image_id": image_id, "category_id": 1, "segmentation": _rle(mask)})
    images = [{"id": i, "file_name": f, "height": H, "width": W} for i, f in file_names.items()]
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "bike"}]}
    folder = root / "refer_seg" / ds
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    return raw_refs, instances


def _pixels(image_id: int, view: int) -> np.ndarray:
    return np.random.default_rng(10 * image_id + view).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A light-field dataset (3 scenes, centre + 4 neighbours) and a 2D REFER-pickle dataset."""
    raw_refs, _ = _annotations(tmp_path, LF, REFS, {i: f"{i}.png" for i in (1, 2, 3)})
    (tmp_path / "refer_seg" / LF / f"{LF}.json").write_text(json.dumps(raw_refs))
    for image_id in (1, 2, 3):
        scene = tmp_path / "lf" / LF / f"Image{image_id}"
        scene.mkdir(parents=True)
        for v, name in enumerate(["5_5", "5_4", "5_6", "4_5", "6_5"]):
            cv2.imwrite(str(scene / f"{name}.png"), _pixels(image_id, v)[..., ::-1])
        np.save(scene / "5_5_disparity.npy", np.full((H, W), 0.25 * image_id, np.float32))
    two_d = {8: (4, "val", [], ["h1", "h2"], _rect(2, 4, 2, 4))}
    raw_refs, _ = _annotations(tmp_path, TWO_D, two_d, {4: "COCO_4.jpg"})
    (tmp_path / "refer_seg" / TWO_D / "refs(unc).p").write_bytes(pickle.dumps(raw_refs, protocol=2))
    (tmp_path / "refer_seg" / TWO_D / "images").mkdir()
    cv2.imwrite(str(tmp_path / "refer_seg" / TWO_D / "images" / "COCO_4.jpg"), _pixels(4, 0))
    return tmp_path


def test_split_datasets() -> None:
    assert split_datasets("a||b") == ["a", "b"]
    assert split_datasets(["a"]) == ["a"]
    with pytest.raises(ValueError):
        split_datasets("||")


def test_val_item_contents(root: Path) -> None:
    data = SceneDataset(root, LF, "val", mode="val")
    assert len(data) == 2 and data.num_expressions == 4
    item = data[0]
    assert item["image_id"] == 2 and item["ds"] == LF
    assert item["scene_dir"] == str(root / "lf" / LF / "Image2")
    np.testing.assert_array_equal(item["center"], _pixels(2, 0))
    assert item["views"].shape == (4, H, W, 3) and item["views"].dtype == np.uint8
    for i in range(4):
        np.testing.assert_array_equal(item["views"][i], _pixels(2, i + 1))
    np.testing.assert_array_equal(item["offsets"], [[0, -1], [0, 1], [-1, 0], [1, 0]])
    assert item["disparity"].dtype == np.float32 and float(item["disparity"][0, 0]) == 0.5
    assert item["sentences"] == ["e1", "e2", "e3"]
    assert item["ref_ids"] == [5, 5, 5]
    assert item["subsets"] == [("val", "o-1", "closest")] * 3
    assert item["masks"].shape == (3, H, W) and item["masks"].dtype == np.uint8
    for mask in item["masks"]:
        np.testing.assert_array_equal(mask, REFS[5][4])


def test_val_by_subset_tag_and_options(root: Path) -> None:
    data = SceneDataset(root, LF, "behind", views="6_5", with_disparity=False)
    assert len(data) == 1
    item = data[0]
    assert item["image_id"] == 3 and item["sentences"] == ["g1"] and item["disparity"] is None
    np.testing.assert_array_equal(item["views"][0], _pixels(3, 4))
    np.testing.assert_array_equal(item["offsets"], [[1, 0]])


def test_train_sampling_distinct_bounded_and_seeded(root: Path) -> None:
    data = SceneDataset(root, LF, "train", mode="train", num_classes_per_sample=3, seed=7)
    assert [s.image_id for s in data.scenes] == [1, 2]
    first = [data[i] for i in range(len(data))]
    for item in first:
        assert 1 <= len(item["ref_ids"]) <= 3
        assert len(set(item["ref_ids"])) == len(item["ref_ids"])
        for ref_id, sent, mask in zip(item["ref_ids"], item["sentences"], item["masks"]):
            assert sent in REFS[ref_id][3] and REFS[ref_id][1] == "train"
            np.testing.assert_array_equal(mask, REFS[ref_id][4])
    assert len(first[0]["ref_ids"]) == 3 and first[1]["ref_ids"] == [6]
    again = SceneDataset(root, LF, "train", mode="train", num_classes_per_sample=3, seed=7)
    assert [again[i]["sentences"] for i in range(2)] == [x["sentences"] for x in first]
    draws = set()
    for epoch in range(12):
        again.set_epoch(epoch)
        draws.add(tuple(again[0]["sentences"]))
    assert len(draws) > 1  # the sample changes with the epoch


def test_train_sampling_same_in_worker_processes(root: Path) -> None:
    data = SceneDataset(root, LF, "train", mode="train", num_classes_per_sample=2, seed=3)
    data.set_epoch(5)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    assert [item["sentences"] for item in loader] == [data[i]["sentences"] for i in range(len(data))]


def test_two_d_source_and_multiple_datasets(root: Path) -> None:
    data = SceneDataset(root, f"{LF}||{TWO_D}", "val", split_by="unc")
    assert data.sources == ["lightfield", "image"] and len(data) == 3
    item = data[2]
    assert item["ds"] == TWO_D and item["image_id"] == 4
    assert item["scene_dir"] == str(root / "refer_seg" / TWO_D / "images" / "COCO_4.jpg")
    assert item["center"].shape == (H, W, 3) and item["views"].shape == (0, H, W, 3)
    assert item["offsets"].shape == (0, 2) and item["disparity"] is None
    assert item["sentences"] == ["h1", "h2"] and item["masks"].shape == (2, H, W)


def test_mask_shape_must_match_centre(root: Path) -> None:
    path = root / "refer_seg" / LF / "instances.json"
    instances = json.loads(path.read_text())
    instances["annotations"][4]["segmentation"] = _rle(np.ones((H, W + 2), np.uint8))
    instances["images"][1]["width"] = W + 2
    path.write_text(json.dumps(instances))
    data = SceneDataset(root, LF, "val")
    with pytest.raises(AnnotationError, match=r"image 2: mask of annotation 105 is \(12, 18\)") as info:
        data[0]
    assert info.value.path == str(path)


def test_bad_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        SceneDataset(root, LF, "val", mode="test")
    with pytest.raises(ValueError, match="source"):
        SceneDataset(root, LF, "val", source="video")
    with pytest.raises(ValueError, match="view spec"):
        SceneDataset(root, LF, "val", views="5_5")


def test_synthetic_dataset_every_val_scene_loads(tiny_dataset: Path) -> None:
    """Integration: the generator's output loads through SceneDataset, every val scene and expression."""
    from dataset.refer import ReferAnnotations

    ds = "ref-urbanlf-syn"
    data = SceneDataset(tiny_dataset, ds, "val", views="4", mode="val")
    refs = ReferAnnotations.load(tiny_dataset, ds).refs_for("val")
    assert len(data) == len({r.image_id for r in refs}) > 0
    expressions = 0
    for item in data:
        h, w = item["center"].shape[:2]
        assert item["views"].shape == (4, h, w, 3) and item["disparity"].shape == (h, w)
        assert np.isfinite(item["disparity"]).all()
        assert item["masks"].shape == (len(item["sentences"]), h, w)
        assert all(m.any() for m in item["masks"])  # every referred object is visible in the centre
        assert all(tags[0] == "val" for tags in item["subsets"])
        expressions += len(item["sentences"])
    assert expressions == data.num_expressions == sum(len(r.sentences) for r in refs)


def test_missing_scene_folder_or_view_is_named_at_load(root: Path) -> None:
    """A ref whose light-field folder or neighbour view is missing fails with the path named."""
    import shutil

    from dataset.errors import LightFieldError

    shutil.rmtree(root / "lf" / LF / "Image3")
    (root / "lf" / LF / "Image2" / "5_6.png").unlink()
    data = SceneDataset(root, LF, "val")
    with pytest.raises(LightFieldError, match=r"5_6\.png: view file not found") as info:
        data[0]
    assert info.value.path == str(root / "lf" / LF / "Image2" / "5_6.png")
    with pytest.raises(LightFieldError, match="scene folder not found") as info:
        data[1]
    assert info.value.path == str(root / "lf" / LF / "Image3")


def test_missing_2d_image_is_named(root: Path) -> None:
    from dataset.errors import LightFieldError

    (root / "refer_seg" / TWO_D / "images" / "COCO_4.jpg").unlink()
    data = SceneDataset(root, TWO_D, "val", split_by="unc")
    with pytest.raises(LightFieldError, match="view file not found") as info:
        data[0]
    assert info.value.path == str(root / "refer_seg" / TWO_D / "images" / "COCO_4.jpg")


def test_probes_replace_the_light_field_input_and_nothing_else(tiny_dataset, tmp_path, capsys):
    """``--eval_input``: swapped_disparity gives each scene the next scene's map (resized and scaled when the
    sizes differ), centre_views replaces every neighbour by the centre; masks and text never change."""
    import shutil

    from dataset.lightfield import read_disparity
    from tests.conftest import TINY_DS
    from training.config import parse_config

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    exact = SceneDataset(data, TINY_DS, "val", views="4")
    n = len(exact)
    assert n >= 3
    items = [exact[i] for i in range(n)]
    donor = exact.scene_path(2) / exact.layout.disparity_name
    h, w = read_disparity(donor).shape
    np.save(donor, np.full((h // 2, w // 2), 1.5, np.float32))  # another size: resized, values x2
    swapped = SceneDataset(data, TINY_DS, "val", views="4", probe="swapped_disparity")
    centred = SceneDataset(data, TINY_DS, "val", views="4", probe="centre_views")
    for i in (0, 1, *range(3, n)):  # scene 2 itself now fails its own size check
        a, b, c = items[i], swapped[i], centred[i]
        nxt = items[(i + 1) % n]["disparity"]
        if i == 1:
            np.testing.assert_array_equal(b["disparity"], np.full((h, w), 3.0, np.float32))
        else:
            np.testing.assert_array_equal(b["disparity"], nxt)
            assert not np.array_equal(b["disparity"], a["disparity"])
        assert c["views"].shape == a["views"].shape and (c["views"] == a["center"][None]).all()
        assert not np.array_equal(c["views"], a["views"])
        np.testing.assert_array_equal(c["disparity"], a["disparity"])
        for probed in (b, c):
            np.testing.assert_array_equal(probed["center"], a["center"])
            np.testing.assert_array_equal(probed["masks"], a["masks"])
            assert probed["sentences"] == a["sentences"]
    with pytest.raises(ValueError, match="probe must be one of exact, swapped_disparity, centre_views"):
        SceneDataset(data, TINY_DS, "val", probe="noise")
    with pytest.raises(ValueError, match="cannot be served from a feature cache"):
        SceneDataset(data, TINY_DS, "val", probe="centre_views", with_pixels=False)
    base = ["--version", "v", "--dataset_dir", str(data), "--eval_input", "swapped_disparity"]
    for extra, said in (
        ([], "only with --eval_only"),
        (["--eval_only", "--feature_cache", str(tmp_path / "fc")], "drop --feature_cache"),
    ):
        with pytest.raises(SystemExit):
            parse_config([*base, *extra])
        assert said in capsys.readouterr().err
    assert parse_config([*base, "--eval_only"]).eval.eval_input == "swapped_disparity"
