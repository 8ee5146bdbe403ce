"""The web demo's logic: pick a bundled light field or upload one, type an expression, get the answer,
the mask overlay, the disparity map, the CAAM-aggregated view and the mask score; with "segment, then
describe" (a model trained with ``--ilvc``) also the model's description of the region it segmented.

``app.py`` is the entry point and ``training/serve/demo_ui.py`` the gradio page; this module holds what they call:
:class:`Demo` runs a :class:`training.serve.predict.Segmenter` (loaded once) on one (scene, expression) query and
composes the pictures (``utils/visualize.py``). Uploads go through ``dataset/upload.py`` (checked,
decoded, rewritten as a scene folder); without a disparity map one is estimated from the uploaded views
(``dataset/disparity``). Bad input of any kind ends as a message in :class:`DemoResult`, never as an
exception.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dataset.disparity.cache import estimate_scenes
from dataset.disparity.config import DisparityConfig
from dataset.errors import DataError
from dataset.options import DEFAULT_ESTIMATED_NAME
from dataset.single_scene import SceneQuery
from dataset.upload import UploadError, UploadLimits, read_upload, write_uploaded_scene
from model.inference import Generated
from model.lfllm import LFLLMForCausalLM
from training.serve.predict import Segmenter, add_segmenter_flags, result_images
from utils.mask_scores import DEFAULT_SCORE, scores_of_one
from utils.visualize import (
    colorize_disparity,
    font_scale,
    text_band,
    upscale_factor,
    upscale_nearest,
    wrap_text,
)

log = logging.getLogger(__name__)
MAX_EXPRESSION_CHARS = 300
UPLOAD = "(my upload)"


@dataclass(frozen=True)
class Example:
    """A bundled light field and a few expressions to try on it."""

    name: str
    scene_dir: Path
    expressions: tuple[str, ...]


def load_examples(folder: str | Path) -> list[Example]:
    """The examples listed in ``<folder>/examples.json`` whose scene folders exist (none: empty list)."""
    index = Path(folder) / "examples.json"
    if not index.is_file():
        return []
    record = json.loads(index.read_text())
    return [
        Example(s["scene"], Path(folder) / s["scene"], tuple(s.get("expressions", ())))
        for s in record.get("scenes", [])
        if (Path(folder) / s["scene"]).is_dir()
    ]


@dataclass
class DemoResult:
    """What the page shows; pictures are RGB uint8 (H, W, 3) or None, ``message`` explains a failure."""

    answer: str = ""
    overlay: np.ndarray | None = None
    disparity: np.ndarray | None = None
    caam: np.ndarray | None = None
    score: str = ""
    message: str = ""
    scores: dict[str, float] | None = field(default=None, repr=False)
    description: str = ""


@torch.no_grad()
def caam_view(model: LFLLMForCausalLM, raw: dict, device: torch.device | str = "cpu") -> np.ndarray | None:
    """The model's CAAM aggregation of a raw scene at its original size: centre (H, W, 3) + views
    (V, H, W, 3) warped with the disparity (H, W) -> (H, W, 3) uint8 RGB; None for a model without CAAM."""
    if model.caam is None or raw.get("disparity") is None or len(raw.get("views", ())) == 0:
        return None
    center = torch.from_numpy(raw["center"]).permute(2, 0, 1)[None].float().div(255).to(device)
    views = torch.from_numpy(np.ascontiguousarray(raw["views"])).permute(0, 3, 1, 2)[None].float().div(255)
    disparity = torch.from_numpy(raw["disparity"])[None].float().to(device)
    out = model.caam(center, views.to(device), disparity)
    return (out[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


def _captioned(image: np.ndarray, caption: str) -> np.ndarray:
    """``image`` enlarged (nearest) to ≥ 512 px with ``caption`` above it."""
    big = upscale_nearest(image, upscale_factor(*image.shape[:2]))
    width = big.shape[1]
    return np.concatenate([text_band(wrap_text(caption, width - 16, font_scale(width)), width), big])


def score_text(result: Generated) -> tuple[str, dict[str, float] | None]:
    """The score line of the page and the scores behind it (None without a mask)."""
    if result.rejected:
        return "no such object: the model answered [REJ]", None
    scores = scores_of_one(result.mask_logits, result.sam_iou)
    if scores is None:
        return "no mask: the answer has no [SEG] token", None
    others = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != DEFAULT_SCORE)
    return f"score {scores[DEFAULT_SCORE]:.2f} ({DEFAULT_SCORE}; {others})", scores


class Demo:
    """One loaded model answering the page's queries (see the module docstring)."""

    def __init__(
        self,
        segmenter: Segmenter,
        examples: list[Example],
        work_dir: str | Path | None = None,
        limits: UploadLimits | None = None,
    ) -> None:
        self.segmenter, self.examples = segmenter, {e.name: e for e in examples}
        self.limits = limits or UploadLimits()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="lfllm-demo-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def run(
        self, example: str | None, uploads: list[str] | None, expression: str, describe: bool = False
    ) -> DemoResult:
        """Segment ``expression`` in the uploaded light field (when files are given) or in ``example``; with
        ``describe``, then describe the segmented region (a model trained with ``--ilvc``)."""
        expression = (expression or "").strip()
        if not expression:
            return DemoResult(message="Type a referring expression, e.g. “the closest car”.")
        if len(expression) > MAX_EXPRESSION_CHARS:
            return DemoResult(
                message=f"The expression is too long (at most {MAX_EXPRESSION_CHARS} characters)."
            )
        scratch = Path(tempfile.mkdtemp(dir=self.work_dir))
        try:
            if uploads:
                scene_dir, depth_source, note = self._uploaded_scene(uploads, scratch)
            elif example in self.examples:
                scene_dir, depth_source, note = self.examples[example].scene_dir, "file", ""
            else:
                return DemoResult(message="Pick one of the example light fields or upload one.")
            if describe and not self.segmenter.can_describe:
                describe = False
                note = (note + " " if note else "") + (
                    "This model was not trained with ILVC answers (--ilvc): it segments but cannot describe."
                )
            result = self._segment(scene_dir, expression, depth_source, describe)
            result.message = note
            return result
        except (DataError, ValueError, OSError) as exc:
            return DemoResult(message=f"Cannot use this light field: {exc}")
        except Exception as exc:  # the page shows a message; the server log keeps the traceback
            log.exception("demo query failed")
            return DemoResult(
                message=f"Something went wrong on the server ({type(exc).__name__}); see its log."
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _uploaded_scene(self, uploads: list[str], scratch: Path) -> tuple[Path, str, str]:
        seg = self.segmenter
        files = read_upload(uploads, self.limits)
        scene = write_uploaded_scene(files, scratch / "scene", seg.layout, seg.offsets, self.limits)
        if scene.has_disparity or not seg.spec.needs_disparity:
            return scene.scene_dir, "file", ""
        if not scene.offsets:
            raise UploadError(
                "no disparity map and no neighbour views to estimate one from: upload the neighbours "
                f"or a {seg.layout.disparity_name}"
            )
        views = ",".join(Path(seg.layout.view_name(o)).stem for o in scene.offsets)
        config = DisparityConfig(views=views)
        estimate_scenes([scene.scene_dir], DEFAULT_ESTIMATED_NAME, seg.layout, config)
        note = f"No disparity map in the upload: estimated from {len(scene.offsets)} neighbour views."
        return scene.scene_dir, "estimate", note

    def _segment(
        self, scene_dir: Path, expression: str, depth_source: str, describe: bool = False
    ) -> DemoResult:
        seg = self.segmenter
        data = seg.dataset([SceneQuery(scene_dir, (expression,))], depth_source=depth_source)
        sample = data[0]
        raw = data.scenes[0]
        # the page's choice, passed only when it differs from the segmenter's own (--describe)
        choice = {} if describe == getattr(seg, "describe", False) else {"describe": describe}
        _, generated = seg.answer_batch([sample], **choice)
        result = generated[0][0]
        _, overlay, _ = result_images(raw["center"], expression, result)
        score, scores = score_text(result)
        disparity = None if raw["disparity"] is None else colorize_disparity(raw["disparity"])
        caam = caam_view(seg.model, raw, seg.device)
        if caam is not None:
            mode = seg.model.caam.mode
            caption = f"CAAM ({mode}): centre + {seg.model.caam.num_views} neighbours warped by the disparity"
            caam = _captioned(caam, caption)
        described = "" if result.description is None else result.description
        return DemoResult(result.text.strip(), overlay, disparity, caam, score, "", scores, described)


def build_parser(version_default: str, examples_default: str) -> argparse.ArgumentParser:
    """The ``app.py`` command line: the model flags of ``chat.py`` plus the page's."""
    p = argparse.ArgumentParser(
        description="LFLLM web demo: pick or upload a light field, type an expression, see the mask.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_segmenter_flags(p, version_default)
    p.add_argument("--examples", default=examples_default, help="folder with examples.json + scene folders")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max_upload_mb", type=int, default=64, help="largest upload accepted")
    return p


def upload_limits(max_upload_mb: int) -> UploadLimits:
    """Upload limits of ``--max_upload_mb``."""
    mib = 1 << 20
    total = max_upload_mb * mib
    return UploadLimits(max_total_bytes=total, max_file_bytes=min(total, UploadLimits().max_file_bytes))
