"""The demo's logic (training/serve/demo.py) with the tiny merged model, the bundled examples, and the validation
pictures of --eval_only --vis_save_path (overlays + summary sheet, per-expression records)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import app
from dataset.synthetic.examples import write_examples
from model.caam import CAAM
from tests.conftest import model_batch
from training.evaluate import evaluate
from training.serve.demo import Demo, caam_view, load_examples
from training.serve.predict import Segmenter, parse_serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tiny_merged, tmp_path_factory) -> Demo:
    parser = app.build_parser(str(tiny_merged), str(ROOT / "examples"))
    args, serve = parse_serve(parser, ["--max_new_tokens", "3"])
    return Demo(Segmenter(serve), load_examples(args.examples), tmp_path_factory.mktemp("work"))


def test_bundled_examples_are_what_the_recorded_command_writes(tmp_path):
    record = write_examples(tmp_path)
    committed = sorted(
        p.relative_to(ROOT / "examples") for p in (ROOT / "examples").rglob("*") if p.is_file()
    )
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in committed:
        assert (ROOT / "examples" / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert sum((ROOT / "examples" / r).stat().st_size for r in committed) < 400_000
    assert [len(s["expressions"]) for s in record["scenes"]] == [3, 3]


def test_example_query_gives_every_picture(demo):
    assert list(demo.examples) == ["Image1", "Image2"]
    result = demo.run("Image1", None, "the rider")
    assert result.message == "" and isinstance(result.answer, str)
    assert max(result.overlay.shape[:2]) >= 512 and result.overlay.shape[1] == 160 * 4
    assert result.disparity.shape[1] > 640 and result.caam.shape[1] == 640
    assert result.score.startswith("score ") == (result.scores is not None)


def test_upload_without_disparity_is_estimated(demo, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for view in ("5_5", "5_4", "5_6", "4_5", "6_5"):
            z.write(ROOT / "examples" / "Image2" / f"{view}.png", f"my_scene/{view}.png")
    upload = tmp_path / "scene.zip"
    upload.write_bytes(buffer.getvalue())
    result = demo.run("(my upload)", [str(upload)], "the closest yellow vehicle")
    assert result.message == "No disparity map in the upload: estimated from 4 neighbour views."
    assert result.overlay is not None and result.disparity is not None and result.caam is not None
    assert list(demo.work_dir.iterdir()) == []  # the scratch scene folder is gone


def test_bad_queries_give_messages_not_exceptions(demo, tmp_path, monkeypatch):
    assert "Type a referring expression" in demo.run("Image1", None, "  ").message
    assert "too long" in demo.run("Image1", None, "x" * 400).message
    assert "Pick one of the example" in demo.run("nope", None, "the car").message
    small = tmp_path / "5_5.png"
    cv2.imwrite(str(small), np.zeros((10, 12, 3), np.uint8))
    other = tmp_path / "5_4.png"
    cv2.imwrite(str(other), np.zeros((11, 12, 3), np.uint8))
    bad = demo.run(None, [str(small), str(other)], "the car")
    assert bad.overlay is None and bad.message.startswith("Cannot use this light field: missing views")
    monkeypatch.setattr(demo.segmenter, "answer_batch", lambda samples: 1 / 0)
    crashed = demo.run("Image1", None, "the car")
    assert crashed.message == "Something went wrong on the server (ZeroDivisionError); see its log."


def test_caam_view_is_the_models_aggregation():
    class Model:
        caam = CAAM(offsets=[(0, -1), (0, 1)], mode="fixed")

    rng = np.random.default_rng(0)
    center = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    views = rng.integers(0, 255, (2, 8, 10, 3), dtype=np.uint8)
    raw = {"center": center, "views": views, "disparity": np.zeros((8, 10), np.float32)}
    want = 0.6 * center + 0.2 * views[0] + 0.2 * views[1]  # zero disparity: no shift, every sample valid
    assert np.abs(caam_view(Model(), raw).astype(float) - want).max() <= 1.0
    Model.caam = None
    assert caam_view(Model(), raw) is None


def test_app_without_a_model_says_how_to_get_one(tmp_path, capsys):
    assert app.main(["--version", str(tmp_path / "missing")]) == 1
    assert "run `bash scripts/quickstart.sh` first" in capsys.readouterr().err


def test_eval_vis_writes_readable_overlays_and_a_summary_sheet(tiny_model, tiny_dataset, tmp_path):
    model, tok = tiny_model
    batches = [model_batch(model, tok, tiny_dataset, split="val", n=2, train=False)]
    metrics = evaluate(model, batches, torch.device("cpu"), vis_dir=tmp_path, show_progress=False)
    expressions = metrics.expressions()
    assert len(expressions) == sum(len(s) for s in batches[0]["sentences"])
    for e in expressions:
        image = cv2.imread(str(tmp_path / e["overlay"]))
        assert max(image.shape[:2]) >= 512 and image.shape[1] > 2 * 96 * 6  # view + disparity beside
        assert 0.0 <= e["score"] <= 1.0 and set(e["scores"]) == {"sam_iou", "confidence", "stability"}
    sheet = cv2.imread(str(tmp_path / "summary_sheet.png"))
    assert sheet is not None and sheet.shape[1] > 1000
    assert metrics.to_json()["expressions"] == expressions
