"""Inputs are checked for what they claim to be (issue 36, criteria 4-5): a disparity that does not align
its views, annotations outside the image, non-strings and non-UTF-8 text where expressions belong, prompts
past the model's positions, feature-cache entries of edited files, a view that decodes badly in a loader
worker, and demo uploads whose headers lie or claim huge images. Each gets one sentence naming the file or
flag and what is wrong; the valid tiny dataset and the estimated disparity still pass."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import struct
import time
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import chat
from dataset.check import check_annotations
from dataset.collate import TokenSpec
from dataset.disparity.cache import estimate_scenes
from dataset.errors import DataError, LightFieldError
from dataset.lightfield import DEFAULT_LAYOUT
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.scenes import SceneDataset
from dataset.single_scene import SceneQueries, SceneQuery, load_scene
from dataset.upload import UploadError, UploadLimits, read_upload, read_zip, write_uploaded_scene
from tests.conftest import TINY_DS
from training.config import parse_config
from training.features import prepare_feature_cache
from training.preflight import check_alignment, check_disparity_alignment, preflight
from training.serve.demo import Demo
from training.serve.predict import read_expressions
from utils.distributed import DistInfo
from utils.image_header import header_size
from utils.views import NEIGHBOURHOODS

ROOT = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FOUR = NEIGHBOURHOODS["4"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(base, data, *extra):
    return parse_config(
        ["--version", str(base["llava"]), "--vision_pretrained", str(base["sam"]), "--dataset_dir", str(data),
         "--refer_seg_data", TINY_DS, "--val_dataset", f"{TINY_DS}|syn|val", "--precision", "fp32", *extra]
    )  # fmt: skip


def _copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    return data


def _scenes(data: Path, split: str = "train") -> list[Path]:
    scenes = SceneDataset(data, TINY_DS, split, views=(), with_disparity=False)
    return [scenes.scene_path(i) for i in range(len(scenes))]


# ------------------------------------------------------------------------------ disparity plausibility
def test_a_depth_map_in_metres_is_refused_naming_scene_file_and_both_errors(
    tiny_base, tiny_dataset, tmp_path
):
    data = _copy(tiny_dataset, tmp_path)
    scene = _scenes(data)[0]
    path = scene / "5_5_disparity.npy"
    disparity = np.load(path)
    depth = (2.0 + (1.6 - disparity) * 10.0).astype(np.float32)  # metres, 2-23: within the 32 px range check
    np.save(path, depth)
    with pytest.raises(DataError) as info:
        preflight(_args(tiny_base, data), train=True, is_main=True)
    text = str(info.value)
    assert f"{path}: scene {scene.name}: this disparity does not align the views" in text
    assert "a depth map must be converted to disparity first" in text
    errors = [float(v) for v in re.findall(r"([0-9.]+) (?:grey levels|with zero)", text)]
    assert len(errors) == 2 and errors[0] > errors[1]  # the warp with it is worse than no warp at all
    assert text.count("does not align") == 1  # only that scene
    other = _scenes(data)[1]  # the opposite sign is refused too (in a scene with enough parallax)
    np.save(other / "5_5_disparity.npy", -np.load(other / "5_5_disparity.npy"))
    problem, checked = check_alignment(other, DEFAULT_LAYOUT, FOUR)
    assert checked and problem is not None and "opposite sign negated" in problem.what


def test_generated_and_estimated_disparity_align_quickly(tiny_base, tiny_dataset, tmp_path):
    summary = preflight(_args(tiny_base, tiny_dataset), train=True, is_main=True)
    assert summary == {"scenes_checked": 9, "disparity_aligned": 8}
    for example in ("Image1", "Image2"):  # the demo's bundled light fields
        assert check_alignment(ROOT / "examples" / example, DEFAULT_LAYOUT) == (None, True)
    data = _copy(tiny_dataset, tmp_path)
    scenes = _scenes(data)[:3]
    estimate_scenes(scenes, "5_5_disparity_est.npy", DEFAULT_LAYOUT)
    estimated = dataclasses.replace(DEFAULT_LAYOUT, disparity_name="5_5_disparity_est.npy")
    tic = time.process_time()
    for scene in scenes:
        assert check_alignment(scene, estimated, FOUR) == (None, True)
    assert (time.process_time() - tic) / len(scenes) < 0.5  # CPU seconds per 64x96 scene (~0.02 measured)
    args = _args(tiny_base, data, "--depth_source", "estimate")
    assert preflight(args, train=True, is_main=True)["disparity_aligned"] >= 2  # the maps present are checked
    groups = [SceneDataset(data, TINY_DS, "train", views=FOUR, with_disparity=False)]
    assert check_disparity_alignment(groups, sample=2)[0] == 2  # first and last scene


# ------------------------------------------------------------------------------------ empty annotations
def test_an_annotation_outside_the_image_is_refused_naming_the_file_and_ids(
    tiny_base, tiny_dataset, tmp_path
):
    data = _copy(tiny_dataset, tmp_path)
    root = data / "refer_seg" / TINY_DS
    refs = json.loads((root / f"{TINY_DS}.json").read_text())
    ref = next(r for r in refs if r["split"] == "train")
    instances = json.loads((root / "instances.json").read_text())
    ann = next(a for a in instances["annotations"] if a["id"] == ref["ann_id"])
    ann["segmentation"] = [[-60.0, -40.0, -10.0, -40.0, -10.0, -5.0, -60.0, -5.0]]
    (root / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(DataError) as info:
        preflight(_args(tiny_base, data), train=True, is_main=True)
    text = str(info.value)
    assert f"{root / 'instances.json'}: ref_id {ref['ref_id']}: annotation {ref['ann_id']}" in text
    assert "covers no pixel of its 96×64 image (its polygons span x -60..-10, y -40..-5" in text
    scenes = SceneDataset(tiny_dataset, TINY_DS, "train", views=(), with_disparity=False)
    assert check_annotations([scenes]) == []  # the generated annotations all cover pixels


# -------------------------------------------------------------------------- strings where strings belong
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"scene": "Image1", "sentence": 7},
            "entry 1 (line 6): 'sentence' must be a string, got a number (7)",
        ),
        (
            {"scene": "Image1", "sentence": ["a", "b"]},
            '\'sentence\' must be a string, got a list (["a", "b"])',
        ),
        ({"scene": "Image1", "sentence": None}, "entry 1 (line 6): 'sentence' must be a string, got null"),
        ({"scene": 3, "sentence": "the car"}, "entry 1 (line 6): 'scene' must be a string, got a number (3)"),
        ({"scene": "Image1", "sentence": "x", "id": [1]}, "'id' must be a string or an integer, got a list"),
        ({"scene": "Image1", "sentence": "the \udcff car"}, "'sentence' is not valid UTF-8 text (byte 0xff"),
        (
            "the car",
            'entry 1 (line 6): expected a {"scene", "sentence", "id"?} object, got a string ("the car")',
        ),
    ],
)
def test_batch_expressions_need_strings(tmp_path, entry, message):
    path = tmp_path / "expr.json"
    path.write_text(json.dumps([{"scene": "Image1", "sentence": "the car"}, entry], indent=2))
    with pytest.raises(DataError) as info:
        read_expressions(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_valid_batch_expressions_still_read(tmp_path):
    path = tmp_path / "expr.json"
    path.write_text(json.dumps([{"scene": "Image1", "sentence": "the c\u00e4r", "id": 7}]))
    assert read_expressions(path) == [{"scene": "Image1", "sentence": "the c\u00e4r", "id": "7"}]
    path.write_bytes(b'[{"scene": "Image1",\n "sentence": "the \xff car"}]')
    with pytest.raises(DataError, match=r"byte 0xff on line 2 is not UTF-8"):
        read_expressions(path)


def test_non_utf8_prompt_bytes_get_a_sentence(tiny_dataset, tmp_path, capsys):
    # Python decodes argv bytes that are not UTF-8 as lone surrogates: b"\xff" -> "\udcff"
    with pytest.raises(SystemExit) as info:
        chat.main(["--version", str(tmp_path), "--lf_dir", str(tmp_path), "--prompt", "the \udcff car"])
    assert info.value.code == 2
    assert "--prompt is not valid UTF-8 text (byte 0xff at character 4" in capsys.readouterr().err
    scene = _scenes(tiny_dataset)[0]
    with pytest.raises(ValueError, match=r"Image\d+: expression 1 is not valid UTF-8 text"):
        load_scene(SceneQuery(scene, ("the \udcff car",)))

    answers = iter(["x", UnicodeDecodeError("utf-8", b"\xfe", 0, 1, "invalid start byte"), "q"])

    def read(prompt: str) -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    chat.interactive(None, tmp_path, read=read)  # the loop goes on after the bad line, then quits
    assert "error: the input is not UTF-8 text (byte 0xfe); type it again" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the model's positions
def test_prompts_past_the_models_positions_are_refused_with_count_and_limit(
    tiny_base, tiny_dataset, tiny_model
):
    with pytest.raises(ValueError) as info:
        preflight(_args(tiny_base, tiny_dataset, "--model_max_length", "8000"), train=True, is_main=True)
    assert str(info.value) == (
        "--model_max_length 8000: a conversation may reach 8030 positions (8000 tokens, each of its 2 "
        "<image>/<depth> placeholder(s) then expanding to 16 visual tokens), beyond the 1024 positions of "
        f"the model (max_position_embeddings of {tiny_base['llava']}); use --model_max_length 994 or less"
    )
    model, tok = tiny_model
    spec = dataclasses.replace(SampleSpec.from_model_config(model.config), new_tokens=32)
    assert spec.max_positions == 1024
    scene = _scenes(tiny_dataset)[0]
    long = " ".join(["the red vehicle behind the bike"] * 1200)
    queries = SceneQueries([SceneQuery(scene, (long,))], offsets=FOUR, need_disparity=True)
    wide = TokenSpec.from_tokenizer(tok, model.config.image_seq_length, 100_000)
    with pytest.raises(DataError) as info:
        ReferSegDataset(queries, tok, spec, wide, train=False, with_answers=False)[0]
    text = str(info.value)
    assert text.startswith(f"{scene}: prompt of ") and "+ 32 image/depth) + 32 tokens to generate" in text
    assert "exceeds the model's 1024 positions (max_position_embeddings)" in text
    count = int(text.split("prompt of ")[1].split(" ")[0])
    assert count > 5000
    narrow = TokenSpec.from_tokenizer(tok, model.config.image_seq_length, 512)  # the default limit
    with pytest.raises(DataError, match=r"prompt of \d+ tokens .* exceeds model_max_length=512; cutting it"):
        ReferSegDataset(queries, tok, spec, narrow, train=False, with_answers=False)[0]
    short = SceneQueries([SceneQuery(scene, ("the red vehicle",))], offsets=FOUR, need_disparity=True)
    assert ReferSegDataset(short, tok, spec, narrow, train=False, with_answers=False)[0]["conversations"]


# ---------------------------------------------------------------------------- feature cache by content
def test_a_cache_entry_follows_an_edited_disparity_of_the_same_size_and_mtime(
    tiny_base, tiny_dataset, tiny_model, tmp_path
):
    model, tok = tiny_model
    data = _copy(tiny_dataset, tmp_path)
    args = _args(tiny_base, data, "--feature_cache", str(tmp_path / "cache"), "--workers", "0")
    store = prepare_feature_cache(args, model, tok, CPU, train=False, val=True)
    entries = sorted(store.folder.rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    path = data / "lf" / TINY_DS / f"Image{entries[0].stem}" / "5_5_disparity.npy"
    before = path.stat()
    edited = np.load(path) * 0.5  # same dtype and shape: the same size in bytes
    np.save(path, edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    prepare_feature_cache(args, model, tok, CPU, train=False, val=True)
    assert [p for p in entries if p.stat().st_mtime_ns != stamps[p]] == [entries[0]]


# ---------------------------------------------------------------------- a view that decodes badly in a worker
def _corrupt_idat(path: Path) -> None:
    """Scramble a PNG's pixel data and fix its CRC: the header reads (and passes the pre-flight check),
    decoding fails."""
    data = bytearray(path.read_bytes())
    i = data.find(b"IDAT")
    (n,) = struct.unpack(">I", data[i - 4 : i])
    for k in range(i + 24, i + 44):
        data[k] ^= 0x5A
    data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 4 + n])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_a_view_that_decodes_badly_in_a_loader_worker_is_one_sentence(tiny_dataset, tmp_path):
    data = _copy(tiny_dataset, tmp_path)
    view = _scenes(data, "val")[0] / "5_4.png"
    _corrupt_idat(view)
    scenes = SceneDataset(data, TINY_DS, "val", views=FOUR)
    loader = DataLoader(scenes, batch_size=1, num_workers=1, collate_fn=lambda items: items)
    with pytest.raises(LightFieldError) as info:
        list(loader)
    assert str(info.value) == (
        f"{view}: cannot decode image (corrupt or not an image) (in DataLoader worker process 0)"
    )
    assert "Traceback" not in str(info.value)
    assert (
        str(LightFieldError("Caught X in background.\nOriginal plain"))
        == "Caught X in background.\nOriginal plain"
    )


# --------------------------------------------------------------------------------------- demo uploads
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _views() -> dict[str, bytes]:
    png = cv2.imencode(".png", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()
    return {DEFAULT_LAYOUT.view_name(o): png for o in ((0, 0), *FOUR)}


def test_header_sizes_are_read_without_decoding():
    image = np.zeros((24, 40, 3), np.uint8)
    assert header_size(cv2.imencode(".png", image)[1].tobytes()) == (40, 24)
    assert header_size(cv2.imencode(".jpg", image)[1].tobytes()) == (40, 24)
    assert header_size(_png_header(60000, 60000)) == (60000, 60000)
    assert header_size(b"GIF89a") is None and header_size(b"\x89PNG\r\n\x1a\n") is None


@pytest.mark.parametrize("side", [60000, 16000])
def test_a_huge_view_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch, side):
    files = _views() | {"5_5.png": _png_header(side, side)}
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("a view was decoded"))
    with pytest.raises(UploadError, match=f"5_5.png is {side}×{side} px; views up to 2048 px per side"):
        write_uploaded_scene(files, tmp_path / "out", DEFAULT_LAYOUT, FOUR)


def _lying_zips() -> dict[str, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in _views().items():
            z.writestr(name, content)
    good = buffer.getvalue()
    central = good.find(b"PK\x01\x02")  # the first member's central-directory record

    def patch(offset: int, value: bytes, at: int = central) -> bytes:
        out = bytearray(good)
        out[at + offset : at + offset + len(value)] = value
        return bytes(out)

    return {
        "name": patch(30, b"6", at=0),  # the local header names another file than the directory
        "crc": patch(16, b"\0\0\0\0"),
        "size": patch(24, struct.pack("<I", 10)),
        "method": patch(10, struct.pack("<H", 99)),
        "encrypted": patch(8, struct.pack("<H", 1)),
        "offset": patch(42, struct.pack("<I", 10**6)),
    }


@pytest.mark.parametrize("lie", ["name", "crc", "size", "method", "encrypted", "offset"])
def test_a_zip_whose_headers_lie_is_explained(lie):
    with pytest.raises(
        UploadError, match=r"the \.zip file is damaged or its headers disagree with its contents"
    ):
        read_zip(_lying_zips()[lie], UploadLimits())


def test_the_demo_says_what_is_wrong_with_such_uploads(tmp_path):
    segmenter = SimpleNamespace(
        layout=DEFAULT_LAYOUT, offsets=list(FOUR), spec=SimpleNamespace(needs_disparity=True)
    )
    demo = Demo(segmenter, [], tmp_path / "work")
    upload = tmp_path / "scene.zip"
    upload.write_bytes(_lying_zips()["crc"])
    message = demo.run(None, [str(upload)], "the car").message
    assert message.startswith("Cannot use this light field: the .zip file is damaged or its headers disagree")
    loose = []
    for name, content in (_views() | {"5_5.png": _png_header(60000, 60000)}).items():
        (tmp_path / name).write_bytes(content)
        loose.append(str(tmp_path / name))
    message = demo.run(None, loose, "the car").message
    assert message == "Cannot use this light field: 5_5.png is 60000×60000 px; views up to 2048 px per side"
    assert read_upload(loose)  # the bytes themselves are small: the header is what gives it away
