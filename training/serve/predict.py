"""Prediction on light fields that have no annotations: a loaded model answers (scene, expressions) queries.

:class:`Segmenter` loads a merged model (or a LLaVA dir + SAM) once and runs the training-time sample
pipeline (same geometry, prompts and tokens) with generation (KV cache, ``model.inference.generate_masks``);
``run_one`` / ``run_batch`` write masks, overlays (≥ 512 px, expression, legend, score, disparity beside)
and, in batch mode, ``results.jsonl`` (one line per expression) + ``results.json``. Scenes are batched on
the device (``batch_size`` scenes, all their expressions, per generation). ``chat.py`` and the web demo
(``training/serve/demo.py``) are the front ends. With ``--describe`` (a model trained with ``--ilvc``) each
answer is continued after its first ``[SEG]``: the *predicted* mask is cropped from the centre view as in
training, its region's tokens appended, and the model's description of it generated
(``model.inference.describe_regions``, "segment, then describe").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataset.collate import TokenSpec, collate_batch, move_batch
from dataset.errors import DataError
from dataset.lightfield import LightFieldLayout, read_rgb
from dataset.options import DataOptions, DepthSource, PromptOptions
from dataset.prompts import text_problem
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.single_scene import SceneQueries, SceneQuery
from model.build import DTYPES, build_lfllm
from model.inference import Generated, generate_masks
from model.options import GenerationOptions
from training.config import RunConfig, RunOptions, config_from_namespace
from training.evaluate import scene_disparity
from training.serve.describe import describe_predicted
from training.serve.merge import merged_record
from utils.batch import Batch
from utils.mask_scores import DEFAULT_SCORE, scores_of_one
from utils.options import add_option_flags, explicit_dests, option
from utils.visualize import annotated_overlay, colorize_disparity, side_by_side, write_png

#: The run options a Segmenter takes from its command line (``--precision``: default by device).
SEGMENTER_RUN_FLAGS = ("version", "vision_pretrained")


@dataclass(frozen=True)
class ServeConfig:
    """What a :class:`Segmenter` loads and how it asks (``chat.py``, ``app.py``): the same
    :class:`training.config.RunConfig` as a run (``run.version`` / ``vision_pretrained`` / ``precision``,
    ``prompt``, ``generation``, ``data``), and the device."""

    config: RunConfig = field(default_factory=RunConfig)
    device: str | None = option(None, "default: cuda when available, else cpu", parse=str)
    describe: bool = option(
        False,
        "segment, then describe: after the answer's first [SEG], its predicted mask's region is cropped, "
        "encoded and described by the model (a model trained with --ilvc)",
    )


def add_segmenter_flags(parser: argparse.ArgumentParser, version_default: str | None = None) -> None:
    """The flags of a :class:`Segmenter` (``chat.py`` and ``app.py``): the model, its device and
    precision, and the prompt, generation and data options (derived from their dataclasses;
    ``conv_type`` defaults to what a merged model recorded in ``merge_info.json``, ``precision`` to bf16
    on GPU, else fp32). ``--version`` is required unless ``version_default`` is given."""
    add_option_flags(
        parser,
        RunOptions,
        only=SEGMENTER_RUN_FLAGS,
        defaults={"version": version_default, "vision_pretrained": None},
        required=() if version_default is not None else ("version",),
    )
    add_option_flags(parser, RunOptions, only=("precision",), unset=True)
    add_option_flags(parser, ServeConfig)
    add_option_flags(parser, PromptOptions, unset=True, skip=("model_max_length",))
    add_option_flags(parser, PromptOptions, skip=("conv_type",))
    add_option_flags(parser, GenerationOptions)
    add_option_flags(parser, DataOptions)


def parse_serve(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, ServeConfig]:
    """Parse a command line with :func:`add_segmenter_flags`' flags: the namespace (for the front end's own
    flags) and the :class:`ServeConfig` the :class:`Segmenter` takes."""
    args = parser.parse_args(argv)
    config = config_from_namespace(args, explicit_dests(parser, argv))
    return args, ServeConfig(config, device=args.device, describe=bool(args.describe))


def recorded_conv_type(version: str | Path) -> str | None:
    """The ``conv_type`` a merged model was trained with (its ``merge_info.json``), if recorded."""
    return ((merged_record(version) or {}).get("prompt_options") or {}).get("conv_type")


class Segmenter:
    """A loaded model + the training-time sample pipeline, answering (scene, expressions) queries."""

    def __init__(self, serve: ServeConfig) -> None:
        cfg = serve.config.with_recorded(merged_record(serve.config.run.version), groups=("prompt",))
        device = torch.device(serve.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = (
            cfg.run.precision if "precision" in cfg.given else ("bf16" if device.type == "cuda" else "fp32")
        )
        model, tokenizer = build_lfllm(cfg.run.version, cfg.run.vision_pretrained, dtype=DTYPES[precision])
        self.model = model.to(device).eval()
        self.tokenizer, self.device = tokenizer, device
        self.max_new_tokens = cfg.generation.max_new_tokens
        config = model.config
        self.conv_type = cfg.prompt.conv_type
        # a prompt must leave the model positions for its answer (SampleSpec.max_positions)
        self.spec = dataclasses.replace(
            SampleSpec.from_model_config(config, self.conv_type), new_tokens=self.max_new_tokens
        )
        self.tokens = TokenSpec.from_tokenizer(
            tokenizer, config.image_seq_length, cfg.prompt.model_max_length
        )
        self.data = cfg.data
        self.depth_source = self.data.depth_source
        self.layout = LightFieldLayout(
            view_pattern=self.data.view_pattern, disparity_name=self.data.disparity_name
        )
        caam = self.spec.caam_clip or self.spec.caam_sam
        self.offsets = [tuple(o) for o in (config.caam_offsets or [])] if caam else []
        self.describe = serve.describe
        if self.describe and not self.can_describe:
            raise ValueError(
                f"--describe: {cfg.run.version} has no <region> token (it was not trained with ILVC answers, "
                "--ilvc); drop --describe"
            )

    @property
    def can_describe(self) -> bool:
        """Whether the model was trained with ILVC answers ("segment, then describe")."""
        return getattr(self.model.config, "region_token_id", None) is not None

    def dataset(
        self, queries: Sequence[SceneQuery], depth_source: DepthSource | None = None
    ) -> ReferSegDataset:
        """Model-ready samples of ``queries`` (prompts end at the answer prefix, ready to generate);
        ``depth_source`` overrides the one of the command line (the demo estimates for uploads)."""
        scenes = SceneQueries(
            queries,
            offsets=self.offsets,
            layout=self.layout,
            need_disparity=self.spec.needs_disparity,
            depth_source=depth_source or self.depth_source,
            estimated_name=self.data.estimated_disparity_name,
        )
        return ReferSegDataset(
            scenes, self.tokenizer, self.spec, self.tokens, train=False, with_answers=False
        )

    def collate(self, samples: Sequence[dict[str, Any]]) -> Batch:
        """Samples of :meth:`dataset` -> one batch on the model's device."""
        return move_batch(collate_batch(list(samples), self.tokenizer.pad_token_id), self.device)

    @torch.no_grad()
    def answer_batch(
        self, samples: Sequence[dict[str, Any]], describe: bool | None = None
    ) -> tuple[Batch, list[list[Generated]]]:
        """Answer every expression of several scenes in one go (one CLIP/SAM pass, one generation); with
        ``describe`` (default: ``--describe``) also describe each predicted region
        (:func:`training.serve.describe.describe_predicted`).

        Returns the batch (for its disparity) and, per scene, one :class:`Generated` per expression.
        """
        batch = self.collate(samples)
        generated = generate_masks(self.model, batch, self.tokenizer, self.max_new_tokens)
        if self.describe if describe is None else describe:
            if not self.can_describe:
                raise ValueError(
                    "this model has no <region> token (not trained with --ilvc): it cannot describe"
                )
            describe_predicted(self.model, self.tokenizer, batch, samples, generated, self.max_new_tokens)
        return batch, generated

    def answer(self, sample: dict[str, Any]) -> list[Generated]:
        """Generate one answer (+ mask logits at the centre view's size) per expression of ``sample``."""
        return self.answer_batch([sample])[1][0]


@dataclass
class Written:
    """What :func:`write_result` wrote for one expression."""

    mask_path: Path
    overlay_path: Path
    scores: dict[str, float] | None

    @property
    def score(self) -> float | None:
        """The reported mask score (``utils.mask_scores.DEFAULT_SCORE``), None without a mask."""
        return None if self.scores is None else self.scores[DEFAULT_SCORE]


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``-_.``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._")
    return name or "mask"


def result_images(
    rgb: np.ndarray, sentence: str, result: Generated, disparity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, float] | None]:
    """(mask (H, W) bool, overlay RGB ≥ 512 px with the disparity beside when given, scores or None). A
    ``[REJ]`` answer ("no such object") gives an empty mask and no score."""
    shown = None if result.rejected else result.mask_logits
    if shown is None:
        mask = np.zeros(rgb.shape[:2], bool)
    else:
        mask = (shown.float() > 0).cpu().numpy()
    scores = scores_of_one(shown, None if result.rejected else result.sam_iou)
    picture = annotated_overlay(
        rgb,
        None if shown is None else mask,
        expression=sentence,
        score=None if scores is None else scores[DEFAULT_SCORE],
        answer=result.text.strip() + (" (no such object)" if result.rejected else ""),
    )
    if disparity is not None:
        picture = side_by_side([picture, colorize_disparity(disparity)])
    return mask, picture, scores


def write_result(
    out_dir: Path,
    name: str,
    center_path: str,
    result: Generated,
    sentence: str = "",
    disparity: np.ndarray | None = None,
) -> Written:
    """Write ``<name>_mask.png`` (0/255, centre-view size) and ``<name>_overlay.png`` (≥ 512 px)."""
    mask, picture, scores = result_images(read_rgb(center_path), sentence, result, disparity)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    write_png(overlay_path, picture)
    return Written(mask_path, overlay_path, scores)


def _report(name: str, result: Generated, written: Written, echo: Callable[[str], None]) -> None:
    echo(f"[{name}] {result.text.strip()}")
    if result.rejected:
        echo(f"[{name}] no such object ([REJ]): wrote an empty mask to {written.mask_path}")
    elif result.mask_logits is None:
        echo(f"[{name}] the answer has no [SEG] token: wrote an empty mask to {written.mask_path}")
    else:
        echo(f"[{name}] mask: {written.mask_path} (score {written.score:.3f})")
    if result.description is not None:
        echo(f"[{name}] description: {result.description}")


def run_one(seg: Segmenter, scene_dir: Path, prompt: str, out_dir: Path, name: str) -> Generated:
    """Segment one expression in one scene and write its PNGs."""
    sample = seg.dataset([SceneQuery(scene_dir, (prompt,))])[0]
    batch, generated = seg.answer_batch([sample])
    result = generated[0][0]
    written = write_result(
        out_dir, name, sample["center_path"], result, sample["sentences"][0], scene_disparity(batch, 0)
    )
    _report(name, result, written, print)
    return result


def _json_kind(value: Any) -> str:
    """``value``'s JSON kind for a message: ``a number (7)``, ``a list (['a'])``, ``null``."""
    kinds = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    if value is None:
        return "null"
    return f"{kinds.get(type(value), type(value).__name__)} ({json.dumps(value)[:60]})"


def _element_lines(text: str, count: int) -> list[int]:
    """The line each of the ``count`` elements of the top-level JSON array ``text`` starts on."""
    decoder, lines = json.JSONDecoder(), []
    pos, line = text.index("[") + 1, text.count("\n", 0, text.index("[")) + 1
    for _ in range(count):
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return lines


def read_expressions(path: Path) -> list[dict[str, str]]:
    """Entries ``{"scene", "sentence", "id"}`` of a batch file (id defaults to ``<scene>_<index>``).

    ``scene`` and ``sentence`` must be non-empty strings (UTF-8 text), ``id`` a string or an integer:
    anything else is refused naming the file, the entry, its line and the field (a number, a list or
    ``null`` would otherwise be segmented as its text)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
        entries = json.loads(text)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            path,
            f"cannot read the expressions JSON: byte 0x{data[exc.start]:02x} on line {line} is not UTF-8 "
            "(save the file as UTF-8)",
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read the expressions JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise DataError(path, 'expected a JSON list of {"scene", "sentence", "id"?} objects')
    lines = _element_lines(text, len(entries))
    out, seen = [], set()
    for i, (entry, line) in enumerate(zip(entries, lines, strict=True)):
        where = f"entry {i} (line {line})"
        if not isinstance(entry, dict):
            raise DataError(
                path, f'{where}: expected a {{"scene", "sentence", "id"?}} object, got {_json_kind(entry)}'
            )
        for key in ("scene", "sentence"):
            value = entry.get(key)
            if key in entry and not isinstance(value, str):
                raise DataError(path, f"{where}: '{key}' must be a string, got {_json_kind(value)}")
            why = None if value is None else text_problem(value)
            if why:
                raise DataError(path, f"{where}: '{key}' {why}")
        if not entry.get("scene") or not str(entry.get("sentence") or "").strip():
            raise DataError(
                path, f"entry {i} needs non-empty 'scene' and 'sentence', got {entry!r} (line {line})"
            )
        ident = entry.get("id", f"{entry['scene']}_{i:04d}")
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise DataError(path, f"{where}: 'id' must be a string or an integer, got {_json_kind(ident)}")
        name = safe_name(str(ident))
        if name in seen:
            raise DataError(path, f"{where}: id {name!r} is used twice (output files would collide)")
        seen.add(name)
        out.append({"scene": entry["scene"], "sentence": entry["sentence"], "id": name})
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_batch(
    seg: Segmenter, lf_root: Path, expressions: Path, out_dir: Path, batch_size: int = 4
) -> list[dict[str, Any]]:
    """One mask per entry of ``expressions``, ``batch_size`` scenes (all their expressions) per forward;
    each scene is read and encoded once. Writes ``results.jsonl`` as it goes (one line per expression:
    id, scene, sentence, answer, has_seg, mask, overlay, score, scores, time_s = the batch's wall time
    shared over its expressions) and ``results.json`` (the same list) at the end."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    entries = read_expressions(expressions)
    by_scene: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        by_scene.setdefault(entry["scene"], []).append(entry)
    groups = list(by_scene.values())
    queries = [SceneQuery(lf_root / g[0]["scene"], tuple(e["sentence"] for e in g)) for g in groups]
    data = seg.dataset(queries)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with (
        open(out_dir / "results.jsonl", "w") as lines,
        tqdm(total=len(entries), desc="chat", unit="expr", dynamic_ncols=True) as bar,
    ):
        for chunk in _chunks(list(range(len(groups))), batch_size):
            start = time.perf_counter()
            samples = [data[j] for j in chunk]
            batch, generated = seg.answer_batch(samples)
            share = (time.perf_counter() - start) / sum(len(groups[j]) for j in chunk)
            for b, j in enumerate(chunk):
                disparity = scene_disparity(batch, b)
                for entry, result in zip(groups[j], generated[b], strict=True):
                    t0 = time.perf_counter()
                    written = write_result(
                        out_dir, entry["id"], samples[b]["center_path"], result, entry["sentence"], disparity
                    )
                    _report(entry["id"], result, written, tqdm.write)
                    record = {
                        **entry,
                        "answer": result.text,
                        "has_seg": result.mask_logits is not None and not result.rejected,
                        "no_such_object": result.rejected,
                        "description": result.description,
                        "mask": written.mask_path.name,
                        "overlay": written.overlay_path.name,
                        "score": written.score,
                        "scores": written.scores,
                        "time_s": round(share + time.perf_counter() - t0, 4),
                    }
                    lines.write(json.dumps(record) + "\n")
                    lines.flush()
                    results.append(record)
                    bar.update()
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
