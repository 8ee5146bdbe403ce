"""Read visual-question-answering conversations: LLaVA-Instruct-150k as LISA reads it, and its light-field
version. Also the pieces every task reader shares (:class:`ImageSource`, :func:`image_sources`).

Files (relative to ``dataset_dir``), one per dataset name ``<name>`` of ``--vqa_data``:

* ``llava_dataset/<name>.json`` (``split="train"``) or ``llava_dataset/<name>_val.json`` (``split="val"``):
  a list of records ``{"id": ..., "image": str, "conversations": [{"from": "human", "value": "<image>\\n…"},
  {"from": "gpt", "value": "…"}, …]}``;
* published (2D) data such as ``llava_instruct_150k`` (LISA's ``--vqa_data`` default): ``"image"`` is a file
  of ``coco/train2017/`` (``000000033471.jpg``); ``image_id`` is its index in the sorted list of the
  json's distinct image names;
* light-field data (``<name>`` is light-field when ``lf/<name>/`` exists, as for referring segmentation):
  ``"image"`` is a scene folder name (``Image<id>``, :meth:`LightFieldLayout.scene_name`) of ``lf/<name>/``,
  and ``image_id`` is that id (the id of the same scene in the referring dataset).

Conversation rules (LISA's ``VQADataset``): a record whose first message is not the human's starts at its
second; the messages then alternate human, gpt, ending with an answer. Each question loses the
``<image>`` marker and the newline joining it to the text (``"<image>\\nQ"`` and ``"Q\\n<image>"`` -> ``"Q"``).
The json's structure is checked when the dataset is built; an image's existence when its item is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.utils.data

from dataset.check import image_size
from dataset.errors import AnnotationError, LightFieldError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout
from dataset.scenes import _per_dataset, split_datasets
from dataset.tasks.base import check_sampling, load_pixels, pixel_fields
from utils.views import Offset

#: Folder of the conversation files, relative to ``dataset_dir`` (LISA's ``llava_dataset``).
VQA_ROOT = "llava_dataset"
#: Folder of the published (COCO) images, relative to ``dataset_dir`` (LISA's ``coco/train2017``).
COCO_IMAGE_ROOT = "coco/train2017"
#: The image placeholder of LLaVA conversations.
IMAGE_MARKER = "<image>"
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class ImageSource:
    """Where the images of one dataset ``ds`` are: light-field scene folders ``lf_dir/<scene_name>`` read
    with ``layout``, or 2D image files."""

    ds: str
    lightfield: bool
    layout: LightFieldLayout
    lf_dir: Path

    def scene_id(self, name: str) -> int | None:
        """The image id of scene folder ``name`` (``"Image12"`` -> 12), or None when ``name`` is not one."""
        before, _, after = self.layout.scene_pattern.partition("{image_id}")
        match = re.fullmatch(re.escape(before) + r"(\d+)" + re.escape(after), name)
        return int(match.group(1)) if match else None

    def image_fields(
        self, path: Path, with_pixels: bool, views: Sequence[Offset], with_disparity: bool
    ) -> tuple[dict[str, Any], tuple[int, int]]:
        """The item's image keys and (H, W): ``center`` / ``views`` / ``offsets`` / ``disparity`` /
        ``scene_dir`` (:func:`pixel_fields`), or, without pixels, ``hw`` and ``scene_dir`` read from the
        centre view's header. Raises ``LightFieldError`` naming the missing or unreadable file."""
        if with_pixels:
            sample = load_pixels(path, self.lightfield, tuple(views), self.layout, with_disparity)
            return pixel_fields(sample), sample.center.shape[:2]
        centre = path / self.layout.view_name((0, 0)) if self.lightfield else path
        hw, problem = image_size(centre)
        if hw is None:
            raise LightFieldError(centre, problem or "cannot read the image size")
        return {"hw": hw, "scene_dir": str(path)}, hw


def image_sources(
    dataset_dir: Path,
    names: Sequence[str],
    layout: LightFieldLayout | Mapping[str, LightFieldLayout],
    lf_root: str | Mapping[str, str],
    with_pixels: bool,
) -> list[ImageSource]:
    """One :class:`ImageSource` per name: light-field when ``dataset_dir/<lf_root of ds>/`` exists.

    Raises ``ValueError`` for a 2D dataset without pixels (a feature cache serves light-field scenes only).
    """
    sources = []
    for ds in names:
        lf_dir = dataset_dir / _per_dataset(lf_root, ds, "lf_root").format(ds=ds)
        source = ImageSource(ds, lf_dir.is_dir(), _per_dataset(layout, ds, "layout"), lf_dir)
        if not with_pixels and not source.lightfield:
            raise ValueError(
                f"dataset {ds!r} is 2D (no {lf_dir}): with_pixels=False serves light-field scenes only "
                "(a feature cache holds light-field encodings)"
            )
        sources.append(source)
    return sources


def strip_image_marker(text: str) -> str:
    """``text`` without the ``<image>`` marker and the newline joining it to the text, stripped."""
    for joined in (IMAGE_MARKER + "\n", "\n" + IMAGE_MARKER, IMAGE_MARKER):
        text = text.replace(joined, "")
    return text.strip()


def parse_conversation(messages: Any) -> list[tuple[str, str]]:
    """The (question, answer) turns of one record's ``conversations`` (see the module docstring).

    Raises ``ValueError`` saying what is wrong: not a list of ``{"from", "value"}`` messages, no message,
    an unknown role, roles not alternating, an unanswered last question or an empty text."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'conversations' must be a non-empty list of messages")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise ValueError(f"message {j} is not a {{'from', 'value': str}} object")
        if message.get("from") not in ROLES:
            raise ValueError(f"message {j} is from {message.get('from')!r}, not one of {ROLES}")
    start = 0 if messages[0]["from"] == "human" else 1  # LISA drops a leading gpt message
    messages = messages[start:]
    for j, message in enumerate(messages):
        if message["from"] != ROLES[j % 2]:
            raise ValueError(f"message {j + start} is from {message['from']!r}: human and gpt must alternate")
    if len(messages) < 2 or len(messages) % 2:
        raise ValueError(f"{len(messages)} messages after the first human one: each question needs an answer")
    turns = []
    for j in range(0, len(messages), 2):
        question, answer = strip_image_marker(messages[j]["value"]), messages[j + 1]["value"].strip()
        if not question or not answer:
            raise ValueError(f"message {j + start + (0 if not question else 1)} is empty")
        turns.append((question, answer))
    return turns


@dataclass(frozen=True)
class _Record:
    ds_index: int
    index: int  # position in the json list
    record_id: str
    image: str
    image_id: int
    turns: tuple[tuple[str, str], ...]


class VQADataset(torch.utils.data.Dataset):
    """Conversations about an image, one item per json record, over one or more datasets.

    Args:
        dataset_dir: root holding ``llava_dataset/``, ``coco/train2017/`` and ``lf/``.
        datasets: names of the json files (``"a||b"`` or a list), e.g. ``"llava_instruct_150k"``.
        split: ``"train"`` (``<name>.json``) or ``"val"`` (``<name>_val.json``).
        mode, num_classes_per_sample, seed: the task readers' common arguments; a conversation is read
            whole, so they change nothing here.
        views: neighbour offsets ``(drow, dcol)`` of light-field scenes.
        layout, lf_root: light-field file names and scene root (``{ds}`` is the name), or one per name.
        with_disparity: load the centre disparity of light-field scenes.
        with_pixels: False: items hold ``hw`` (H, W) instead of pixels (light-field data only).

    Items: ``task`` "vqa", ``turns`` list[(question, answer)], ``image_id``, ``ds``, ``scene_dir``, the
    pixels (``center`` (H, W, 3) uint8, ``views`` (V, H, W, 3), ``offsets`` (V, 2), ``disparity`` (H, W) or
    None) or ``hw``, ``masks`` (0, H, W) uint8, and empty ``sentences`` / ``ref_ids`` / ``subsets`` /
    ``no_target`` / ``is_sentence`` / ``explanations``.
    """

    task = "vqa"

    def __init__(
        self,
        dataset_dir: str | Path,
        datasets: str | Sequence[str],
        split: str = "train",
        *,
        mode: Literal["train", "val"] = "train",
        num_classes_per_sample: int = 3,
        seed: int = 0,
        views: Sequence[Offset] = (),
        layout: LightFieldLayout | Mapping[str, LightFieldLayout] = DEFAULT_LAYOUT,
        lf_root: str | Mapping[str, str] = "lf/{ds}",
        with_disparity: bool = True,
        with_pixels: bool = True,
    ) -> None:
        check_sampling(mode, num_classes_per_sample)
        if split not in ("train", "val"):
            raise ValueError(f"VQA split must be 'train' or 'val', got {split!r}")
        self.dataset_dir = Path(dataset_dir)
        self.names = split_datasets(datasets)
        self.split, self.mode, self.seed, self.epoch = split, mode, seed, 0
        self.num_classes_per_sample = num_classes_per_sample
        self.offsets: tuple[Offset, ...] = tuple((int(r), int(c)) for r, c in views)
        self.with_disparity, self.with_pixels = with_disparity, with_pixels
        self.sources = image_sources(self.dataset_dir, self.names, layout, lf_root, with_pixels)
        self.layout = self.sources[0].layout
        suffix = "" if split == "train" else "_val"
        self.json_paths = [self.dataset_dir / VQA_ROOT / f"{ds}{suffix}.json" for ds in self.names]
        self.records: list[_Record] = []
        for ds_index in range(len(self.names)):
            self.records.extend(self._read(ds_index))

    def _read(self, ds_index: int) -> list[_Record]:
        """The validated records of dataset ``ds_index``'s json."""
        path, source = self.json_paths[ds_index], self.sources[ds_index]
        if not path.is_file():
            what = "validation" if self.split == "val" else "training"
            raise AnnotationError(path, f"{what} conversation file of VQA dataset {source.ds!r} not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AnnotationError(path, f"cannot read as JSON ({exc})") from None
        if not isinstance(raw, list):
            raise AnnotationError(path, f"expected a list of records, got {type(raw).__name__}")
        parsed = []
        for index, record in enumerate(raw):
            record_id = str(record.get("id")) if isinstance(record, dict) else "?"
            where = f"record {index} (id {record_id!r})"
            if not isinstance(record, dict):
                raise AnnotationError(path, f"{where} is not an object")
            image = record.get("image")
            if not isinstance(image, str) or not image.strip():
                raise AnnotationError(path, f"{where}: missing image (a non-empty 'image' string)")
            try:
                turns = parse_conversation(record.get("conversations"))
            except ValueError as exc:
                raise AnnotationError(path, f"{where}: {exc}") from None
            image_id = source.scene_id(image) if source.lightfield else 0
            if image_id is None:
                expected = source.layout.scene_name("<id>")
                raise AnnotationError(
                    path, f"{where}: image {image!r} is not a scene folder name like {expected!r}"
                )
            parsed.append(_Record(ds_index, index, record_id, image, image_id, tuple(turns)))
        if not source.lightfield:  # a stable id per distinct image file
            ids = {name: i for i, name in enumerate(sorted({r.image for r in parsed}))}
            parsed = [dataclasses.replace(r, image_id=ids[r.image]) for r in parsed]
        return parsed

    def __len__(self) -> int:
        return len(self.records)

    def group_of(self, index: int) -> int:
        """Index into :attr:`names` of item ``index``'s dataset."""
        return self.records[index].ds_index

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (kept for the task readers' common interface: VQA items do not sample)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        """Scene folder (light field) or image file (2D) of item ``index``."""
        record = self.records[index]
        source = self.sources[record.ds_index]
        root = source.lf_dir if source.lightfield else self.dataset_dir / COCO_IMAGE_ROOT
        return root / record.image

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        source = self.sources[record.ds_index]
        path = self.image_path(index)
        if not (path.is_dir() if source.lightfield else path.is_file()):
            what = "scene folder" if source.lightfield else "image file"
            raise AnnotationError(
                self.json_paths[record.ds_index],
                f"record {record.index} (id {record.record_id!r}): {what} {path} not found",
            )
        fields, hw = source.image_fields(path, self.with_pixels, self.offsets, self.with_disparity)
        return {
            "task": self.task,
            "image_id": record.image_id,
            "ds": source.ds,
            **fields,
            "turns": list(record.turns),
            "sentences": [],
            "masks": np.zeros((0, *hw), dtype=np.uint8),
            "ref_ids": [],
            "subsets": [],
            "no_target": [],
            "is_sentence": [],
            "explanations": [],
        }
