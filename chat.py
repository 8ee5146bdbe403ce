"""Segment what an expression refers to in a light field: the model answers in text and with a mask.

Three modes (same model, prompts and preprocessing as training and validation):

* one-shot: ``--lf_dir SCENE --prompt "the car behind the woman" --out OUT``;
* batch: ``--lf_root ROOT --expressions FILE.json --out OUT``, FILE.json a list of
  ``{"scene": "Image7", "sentence": "...", "id": optional}``: ``--batch_size`` scenes per forward on the
  device, a progress bar, one mask per entry and one JSON line per entry in ``OUT/results.jsonl`` (answer,
  mask file, score, time; ``OUT/results.json`` holds the same list);
* interactive (neither): asks for a light-field folder and an expression in a loop, the model loaded once.

The answer is generated (KV cache, ``model.inference.generate_masks``) and printed with the mask score
(``utils.mask_scores``); the mask of its first ``[SEG]`` is written as ``OUT/<name>_mask.png`` (0/255,
centre-view size) with ``OUT/<name>_overlay.png`` (≥ 512 px: expression, legend, score, disparity beside).
An answer without ``[SEG]`` gets an empty mask (and says so). The disparity map comes from the scene
folder (``--disparity_name``) or from the estimator (``--depth_source estimate``). ``--describe`` (a model
trained with ``--ilvc``): segment, then describe -- the answer stops at its first ``[SEG]``, the predicted
mask's region is cropped and encoded, and the model's description of it is printed (and in ``results.jsonl``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dataset.errors import DataError
from dataset.prompts import text_problem
from training.serve.predict import (
    Segmenter,
    ServeConfig,
    add_segmenter_flags,
    parse_serve,
    run_batch,
    run_one,
    safe_name,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``chat.py`` command line."""
    p = argparse.ArgumentParser(
        description="LFLLM chat: light field + referring expression -> answer, mask and overlay.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_segmenter_flags(p)
    p.add_argument("--out", "--vis_save_path", dest="out", default="./vis_output", help="output folder")
    one = p.add_argument_group("one-shot")
    one.add_argument("--lf_dir", default=None, help="light-field scene folder (views + disparity)")
    one.add_argument("--prompt", default=None, help="the referring expression")
    one.add_argument("--name", default=None, help="output file prefix (default: the scene folder name)")
    many = p.add_argument_group("batch")
    many.add_argument("--lf_root", default=None, help="folder holding the scene folders")
    many.add_argument("--expressions", default=None, help='JSON list of {"scene", "sentence", "id"?}')
    many.add_argument("--batch_size", type=int, default=4, help="scenes per forward on the device")
    return p


def serve_config(argv: Sequence[str] | None = None) -> ServeConfig:
    """The model, prompt, generation and data options of a ``chat.py`` command line."""
    return parse_serve(build_parser(), argv)[1]


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
        except UnicodeDecodeError as exc:  # a terminal that sends bytes other than UTF-8
            print(f"error: the input is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); type it again")
            continue
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
    args, serve = parse_serve(parser, argv)
    if (args.lf_dir is None) != (args.prompt is None):
        parser.error("one-shot mode needs both --lf_dir and --prompt")
    if (args.lf_root is None) != (args.expressions is None):
        parser.error("batch mode needs both --lf_root and --expressions")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.lf_dir and args.lf_root:
        parser.error("choose one-shot (--lf_dir/--prompt) or batch (--lf_root/--expressions), not both")
    if args.prompt is not None and text_problem(args.prompt):
        parser.error(f"--prompt {text_problem(args.prompt)}")  # before the model is loaded
    out_dir = Path(args.out)
    try:
        seg = Segmenter(serve)
        if args.lf_dir:
            scene = Path(args.lf_dir)
            run_one(seg, scene, args.prompt, out_dir, safe_name(args.name or scene.name))
        elif args.lf_root:
            run_batch(seg, Path(args.lf_root), Path(args.expressions), out_dir, args.batch_size)
        else:
            interactive(seg, out_dir)
    except (DataError, RuntimeError, ValueError, OSError) as exc:  # bad input: a message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
