"""Malformed input of every kind a user can give, and what each gets (the table of docs/RELIABILITY.md).

Each case is (input, what is done with it, the message expected). The flag cases go through
``train_ds.py``'s parser; files through the readers the training, merge and chat paths use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.errors import AnnotationError, DataError, LightFieldError
from dataset.lightfield import read_disparity, read_rgb
from dataset.refer import ReferAnnotations
from dataset.single_scene import SceneQuery, load_scene
from model.sam import load_sam
from tests.conftest import TINY_DS
from training.config import parse_args
from training.serve.predict import read_expressions
from training.weights import open_weights

FLAG_CASES = [
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--batch_size", "-2"], "--batch_size -2: must be >= 1"),
    (["--lr", "nan"], "--lr nan: out of range"),
    (["--lr", "0"], "--lr 0.0: out of range"),
    (["--beta2", "1.5"], "--beta2 1.5: out of range"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0: out of range"),
    (["--lora_r", "-1"], "--lora_r -1: must be >= 0"),
    (["--lora_target_modules", ""], "--lora_target_modules is empty"),
    (["--dice_loss_weight", "inf"], "--dice_loss_weight inf: must be a finite number"),
    (["--model_max_length", "0"], "--model_max_length 0: must be >= 1"),
    (["--num_classes_per_sample", "0"], "--num_classes_per_sample 0: must be >= 1"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--caam_mode", "magic"], "invalid choice: 'magic'"),
    (["--caam_views", ""], "empty view spec"),
    (["--caam_views", "5_4,5_4"], "listed twice"),
    (["--depth_range", "1"], "expected 'lo,hi'"),
    (["--depth_range=-1,nan"], "lo must be < hi"),
    (["--val_dataset", "only-a-name"], "expected 'ds|splitBy|split'"),
    (["--view_pattern", "{row}.png"], "must name each view by {row} and {col}"),
    (["--view_pattern", "{r}_{c}.png"], "with {row} and {col} only"),
    (["--lf_dir_pattern", "lf/{ds}"], "must contain {image_id}"),
    (["--disparity_name", "a/b.npy"], "expected a file name inside the scene folder"),
    (["--disparity_name", "syn="], "expected 'dataset=value,dataset=value'"),
    (["--estimated_disparity_name", "d.png"], "plain file name ending in .npy"),
    (["--disparity_set", "num_planes=0"], "num_planes"),
    (["--sample_rates", "x"], "expected numbers like '3,1'"),
    (["--start_epoch", "2"], "comes from its checkpoint"),
    (["--dataset", "vqa||depth_seg"], "unknown task(s) ['depth_seg']"),
    (["--dataset", "sem_seg||refer_seg", "--sample_rates", "3,1,2"], "3 rates for the 2 tasks of --dataset"),
    (["--dataset", "vqa", "--refer_seg_sample_rates", "2"], "--dataset 'vqa' has no refer_seg task"),
    (["--explanatory", "2"], "must be a share in [0, 1], or -1"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
]


@pytest.mark.parametrize(("argv", "message"), FLAG_CASES, ids=[" ".join(a) or "''" for a, _ in FLAG_CASES])
def test_malformed_flags_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _png(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_malformed_image_and_disparity_files(tmp_path):
    cases = [
        (_png(tmp_path / "empty.png", b""), "cannot decode image"),
        (_png(tmp_path / "text.png", "not an image, ünïcödé".encode()), "cannot decode image"),
        (_png(tmp_path / "half.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "cannot decode image"),
        (tmp_path / "missing.png", "view file not found"),
    ]
    for path, message in cases:
        with pytest.raises(LightFieldError, match=message) as info:
            read_rgb(path)
        assert info.value.path == str(path)
    for array, message in [
        (np.zeros((0, 0), np.float32), r"does not match expected \(H, W\) \(4, 5\)"),
        (np.zeros((4, 5), np.bool_), "integer dtype bool|real numeric"),
        (np.full((4, 5), 1e30, np.float64), "beyond the plausible"),
        (np.zeros((4, 5, 3), np.float32), r"must be \(H, W\)"),
    ]:
        np.save(tmp_path / "d.npy", array)
        with pytest.raises(LightFieldError, match=message):
            read_disparity(tmp_path / "d.npy", (4, 5))
    (tmp_path / "d.npy").write_bytes(os.urandom(300))
    with pytest.raises(LightFieldError, match="cannot read disparity"):
        read_disparity(tmp_path / "d.npy", (4, 5))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "JSON syntax error"),
        (b"\xff\xfe\x00garbage", "cannot read refs file"),
        (b'{"refs": []}', "expected a list of refs"),
        (b'[{"ref_id": 1}]', r"ref #0 \(ref_id 1\) lacks ann_id, image_id, split, sentences"),
        (b"[1, 2]", "is a int, expected an object"),
    ],
)
def test_malformed_annotation_files_are_named(tiny_dataset, tmp_path, content, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "refer_seg", data / "refer_seg")
    (data / "refer_seg" / TINY_DS / f"{TINY_DS}.json").write_bytes(content)
    with pytest.raises(AnnotationError, match=message) as info:
        ReferAnnotations.load(data, TINY_DS)
    assert info.value.path.endswith(f"{TINY_DS}.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "cannot read the expressions JSON"),
        (b"\xff\xfe\xfa", "cannot read the expressions JSON"),
        (b'{"scene": "Image1"}', "expected a JSON list"),
        (b'[{"scene": "Image1", "sentence": "   "}]', "needs non-empty 'scene' and 'sentence'"),
        (b'[{"scene": "", "sentence": "the car"}]', "needs non-empty 'scene' and 'sentence'"),
        (
            b'[{"scene": "a", "sentence": "x", "id": "k"}, {"scene": "b", "sentence": "y", "id": "k"}]',
            "used twice",
        ),
    ],
)
def test_malformed_expression_files_for_chat_batch_mode(tmp_path, content, message):
    path = tmp_path / "expr.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_expressions(path)
    assert info.value.path == str(path)


def test_prompt_text_empty_or_whitespace_is_refused(tiny_dataset):
    scene = next((tiny_dataset / "lf" / TINY_DS).iterdir())
    for text in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="non-empty expression"):
            load_scene(SceneQuery(scene, (text,)))
    odd = load_scene(SceneQuery(scene, ("the c\u00e4r \U0001f697 on the left",)), need_disparity=False)
    assert odd["sentences"] == ["the c\u00e4r \U0001f697 on the left"]


def test_weight_files_of_the_wrong_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: cannot read as a PyTorch state dict"):
        open_weights(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="--weight not found"):
        open_weights(tmp_path / "none")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no trainable\.safetensors, no DeepSpeed checkpoint"):
        open_weights(tmp_path / "folder")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sam.pth")
    with pytest.raises(ValueError, match=r"sam\.pth: not a SAM state dict"):
        load_sam(tmp_path / "sam.pth")
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(7, 3, 16, 16)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: no SAM variant has a 7-wide"):
        load_sam(tmp_path / "odd.pth")
    (tmp_path / "sam.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"sam\.json: cannot read SAM checkpoint"):
        load_sam(tmp_path / "sam.json")
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found"):
        load_sam(tmp_path / "absent.pth")


def test_a_sam_of_the_wrong_shape_names_the_file(tiny_base, tmp_path):
    state = torch.load(tiny_base["sam"], weights_only=True)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bent.pth")
    with pytest.raises(
        ValueError, match=r"bent\.pth: tensor shapes do not match the tiny SAM .*size mismatch"
    ):
        load_sam(tmp_path / "bent.pth")
