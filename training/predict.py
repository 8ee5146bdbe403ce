"""Prediction on light fields that have no annotations: a loaded model answers (scene, expressions) queries.

:class:`Segmenter` loads a merged model (or a LLaVA dir + SAM) once and runs the training-time sample
pipeline (same geometry, prompts and tokens) with generation (KV cache, ``model.inference.generate_masks``);
``run_one`` / ``run_batch`` write masks and overlays. ``chat.py`` (and the demo) are the front ends.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataset.collate import TokenSpec, collate_batch, move_batch
from dataset.errors import DataError
from dataset.lightfield import LightFieldLayout, read_rgb
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.single_scene import SceneQueries, SceneQuery
from model.build import DTYPES, build_lfllm
from model.inference import Generated, generate_masks
from training.config import data_options
from training.evaluate import overlay


def recorded_conv_type(version: str | Path) -> str | None:
    """The ``conv_type`` a merged model was trained with (its ``merge_info.json``), if recorded."""
    info = Path(version) / "merge_info.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("conv_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{info}: not a JSON object ({exc})") from exc


class Segmenter:
    """A loaded model + the training-time sample pipeline, answering (scene, expressions) queries."""

    def __init__(self, args: argparse.Namespace) -> None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        model, tokenizer = build_lfllm(args.version, args.vision_pretrained, dtype=DTYPES[precision])
        self.model = model.to(device).eval()
        self.tokenizer, self.device, self.max_new_tokens = tokenizer, device, args.max_new_tokens
        config = model.config
        self.conv_type = args.conv_type or recorded_conv_type(args.version) or "llava_v1"
        self.spec = SampleSpec.from_model_config(config, self.conv_type)
        self.tokens = TokenSpec.from_tokenizer(tokenizer, config.image_seq_length, args.model_max_length)
        self.data = data_options(args)
        self.depth_source = self.data.depth_source
        self.layout = LightFieldLayout(
            view_pattern=self.data.view_pattern, disparity_name=self.data.disparity_name
        )
        caam = self.spec.caam_clip or self.spec.caam_sam
        self.offsets = [tuple(o) for o in (config.caam_offsets or [])] if caam else []

    def dataset(self, queries: Sequence[SceneQuery]) -> ReferSegDataset:
        """Model-ready samples of ``queries`` (prompts end at the answer prefix, ready to generate)."""
        scenes = SceneQueries(
            queries,
            offsets=self.offsets,
            layout=self.layout,
            need_disparity=self.spec.needs_disparity,
            depth_source=self.depth_source,
            estimated_name=self.data.estimated_disparity_name,
        )
        return ReferSegDataset(
            scenes, self.tokenizer, self.spec, self.tokens, train=False, with_answers=False
        )

    @torch.no_grad()
    def answer(self, sample: dict[str, Any]) -> list[Generated]:
        """Generate one answer (+ mask logits at the centre view's size) per expression of ``sample``."""
        batch = move_batch(collate_batch([sample], self.tokenizer.pad_token_id), self.device)
        return generate_masks(self.model, batch, self.tokenizer, self.max_new_tokens)[0]


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``-_.``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._")
    return name or "mask"


def write_result(out_dir: Path, name: str, center_path: str, result: Generated) -> Path:
    """Write ``<name>_mask.png`` (0/255) and ``<name>_overlay.png``; returns the mask path."""
    rgb = read_rgb(center_path)
    if result.mask_logits is None:
        mask = np.zeros(rgb.shape[:2], bool)
    else:
        mask = (result.mask_logits.float() > 0).cpu().numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path = out_dir / f"{name}_mask.png"
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    cv2.imwrite(str(out_dir / f"{name}_overlay.png"), cv2.cvtColor(overlay(rgb, mask), cv2.COLOR_RGB2BGR))
    return mask_path


def _report(name: str, result: Generated, mask_path: Path, echo: Callable[[str], None]) -> None:
    echo(f"[{name}] {result.text.strip()}")
    if result.mask_logits is None:
        echo(f"[{name}] the answer has no [SEG] token: wrote an empty mask to {mask_path}")
    else:
        echo(f"[{name}] mask: {mask_path}")


def run_one(seg: Segmenter, scene_dir: Path, prompt: str, out_dir: Path, name: str) -> Generated:
    """Segment one expression in one scene and write its PNGs."""
    sample = seg.dataset([SceneQuery(scene_dir, (prompt,))])[0]
    result = seg.answer(sample)[0]
    _report(name, result, write_result(out_dir, name, sample["center_path"], result), print)
    return result


def read_expressions(path: Path) -> list[dict[str, str]]:
    """Entries ``{"scene", "sentence", "id"}`` of a batch file (id defaults to ``<scene>_<index>``)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read the expressions JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise DataError(path, 'expected a JSON list of {"scene", "sentence", "id"?} objects')
    out, seen = [], set()
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not entry.get("scene")
            or not str(entry.get("sentence", "")).strip()
        ):
            raise DataError(path, f"entry {i} needs non-empty 'scene' and 'sentence', got {entry!r}")
        name = safe_name(entry.get("id", f"{entry['scene']}_{i:04d}"))
        if name in seen:
            raise DataError(path, f"entry {i}: id {name!r} is used twice (output files would collide)")
        seen.add(name)
        out.append({"scene": str(entry["scene"]), "sentence": str(entry["sentence"]), "id": name})
    return out


def run_batch(seg: Segmenter, lf_root: Path, expressions: Path, out_dir: Path) -> list[dict[str, Any]]:
    """One mask per entry of ``expressions``; each scene is read and encoded once. Writes results.json."""
    entries = read_expressions(expressions)
    by_scene: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        by_scene.setdefault(entry["scene"], []).append(entry)
    queries = [
        SceneQuery(lf_root / scene, tuple(e["sentence"] for e in group)) for scene, group in by_scene.items()
    ]
    data = seg.dataset(queries)
    results = []
    with tqdm(total=len(entries), desc="chat", unit="expr", dynamic_ncols=True) as bar:
        for index, group in enumerate(by_scene.values()):
            sample = data[index]
            for entry, result in zip(group, seg.answer(sample), strict=True):
                mask_path = write_result(out_dir, entry["id"], sample["center_path"], result)
                _report(entry["id"], result, mask_path, tqdm.write)
                results.append(
                    {
                        **entry,
                        "answer": result.text,
                        "has_seg": result.mask_logits is not None,
                        "mask": mask_path.name,
                    }
                )
                bar.update()
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
