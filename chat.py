"""Segment what an expression refers to in a light field: the model answers in text and with a mask.

Three modes (same model, prompts and preprocessing as training and validation):

* one-shot: ``--lf_dir SCENE --prompt "the car behind the woman" --out OUT``;
* batch: ``--lf_root ROOT --expressions FILE.json --out OUT``, FILE.json a list of
  ``{"scene": "Image7", "sentence": "...", "id": optional}`` (one mask per entry, ``OUT/results.json``);
* interactive (neither): asks for a light-field folder and an expression, in a loop.

The answer is generated (KV cache, ``model.inference.generate_masks``) and printed; the mask of its first
``[SEG]`` is written as ``OUT/<name>_mask.png`` (0/255, centre-view size) with ``OUT/<name>_overlay.png``.
An answer without ``[SEG]`` gets an empty mask (and says so). The disparity map comes from the scene
folder (``--disparity_name``) or from the estimator (``--depth_source estimate``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
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
from dataset.single_scene import DEPTH_SOURCES, SceneQueries, SceneQuery
from model.build import DTYPES, build_lfllm
from model.inference import Generated, generate_masks
from utils.evaluate import overlay


def build_parser() -> argparse.ArgumentParser:
    """The ``chat.py`` command line."""
    p = argparse.ArgumentParser(
        description="LFLLM chat: light field + referring expression -> answer, mask and overlay.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", required=True, help="merged LFLLM dir (or a base LLaVA dir + SAM)")
    p.add_argument("--vision_pretrained", default=None, help="SAM checkpoint, only with a base LLaVA dir")
    p.add_argument(
        "--precision", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, else fp32"
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--conv_type",
        default=None,
        choices=["llava_v1", "llava_llama_2"],
        help="default: the one recorded in the merged model's merge_info.json, else llava_v1",
    )
    p.add_argument("--model_max_length", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--view_pattern", default="{row}_{col}.png")
    p.add_argument("--disparity_name", default="5_5_disparity.npy", help="e.g. 5_5_disparity_OAVC.npy")
    p.add_argument(
        "--depth_source", default="file", choices=DEPTH_SOURCES, help="disparity file or estimator"
    )
    p.add_argument("--out", "--vis_save_path", dest="out", default="./vis_output", help="output folder")
    one = p.add_argument_group("one-shot")
    one.add_argument("--lf_dir", default=None, help="light-field scene folder (views + disparity)")
    one.add_argument("--prompt", default=None, help="the referring expression")
    one.add_argument("--name", default=None, help="output file prefix (default: the scene folder name)")
    many = p.add_argument_group("batch")
    many.add_argument("--lf_root", default=None, help="folder holding the scene folders")
    many.add_argument("--expressions", default=None, help='JSON list of {"scene", "sentence", "id"?}')
    return p


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
        self.layout = LightFieldLayout(view_pattern=args.view_pattern, disparity_name=args.disparity_name)
        caam = self.spec.caam_clip or self.spec.caam_sam
        self.offsets = [tuple(o) for o in (config.caam_offsets or [])] if caam else []
        self.depth_source = args.depth_source

    def dataset(self, queries: Sequence[SceneQuery]) -> ReferSegDataset:
        """Model-ready samples of ``queries`` (prompts end at the answer prefix, ready to generate)."""
        scenes = SceneQueries(
            queries,
            offsets=self.offsets,
            layout=self.layout,
            need_disparity=self.spec.needs_disparity,
            depth_source=self.depth_source,
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


def interactive(seg: Segmenter, out_dir: Path, read: Callable[[str], str] = input) -> None:
    """Ask for a scene folder (Enter keeps the last one) and an expression until EOF or 'q'."""
    scene, count = None, 0
    while True:
        try:
            answer = read(f"Light-field folder{f' [{scene}]' if scene else ''} (q to quit): ").strip()
            if answer.lower() in ("q", "quit", "exit"):
                return
            scene = Path(answer) if answer else scene
            if scene is None:
                continue
            prompt = read("Expression: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not prompt:
            continue
        count += 1
        try:
            run_one(seg, scene, prompt, out_dir, f"{safe_name(scene.name)}_{count:03d}")
        except (DataError, RuntimeError, ValueError) as exc:
            print(f"error: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.lf_dir is None) != (args.prompt is None):
        parser.error("one-shot mode needs both --lf_dir and --prompt")
    if (args.lf_root is None) != (args.expressions is None):
        parser.error("batch mode needs both --lf_root and --expressions")
    if args.lf_dir and args.lf_root:
        parser.error("choose one-shot (--lf_dir/--prompt) or batch (--lf_root/--expressions), not both")
    out_dir = Path(args.out)
    try:
        seg = Segmenter(args)
        if args.lf_dir:
            scene = Path(args.lf_dir)
            run_one(seg, scene, args.prompt, out_dir, safe_name(args.name or scene.name))
        elif args.lf_root:
            run_batch(seg, Path(args.lf_root), Path(args.expressions), out_dir)
        else:
            interactive(seg, out_dir)
    except (DataError, RuntimeError, ValueError, OSError) as exc:  # bad input: a message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
