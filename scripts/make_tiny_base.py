"""Write a tiny HF LLaVA directory + tiny SAM checkpoint for the CPU quickstart and smoke runs.

The tokenizer is trained offline on every sentence of ``<dataset_dir>/refer_seg/<ds>/<ds>.json`` (plus the
prompt templates), so any dataset written by ``dataset/synthetic.py`` (or a real Ref-UrbanLF copy) works.

Usage::

    python scripts/make_tiny_base.py --out ./tiny_base --dataset_dir ./dataset --ds ref-urbanlf-syn
    # then: --version ./tiny_base/llava --vision_pretrained ./tiny_base/sam_tiny.pth
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.scenes import split_datasets
from model.presets import SamPretrainOptions, train_split_objects, write_tiny_base


def dataset_sentences(dataset_dir: str | Path, datasets: str) -> list[str]:
    """Every sentence of the refs of ``datasets`` (``a||b`` allowed). Raises ``FileNotFoundError`` /
    ``ValueError`` naming the JSON file when it is missing, malformed or holds no sentence."""
    sentences: list[str] = []
    for ds in split_datasets(datasets):
        path = Path(dataset_dir) / "refer_seg" / ds / f"{ds}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: referring-expression JSON not found (check --dataset_dir / --ds)"
            )
        try:
            refs = json.loads(path.read_text())
            found = [s["sent"] for ref in refs for s in ref["sentences"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: expected a list of refs with sentences[{{'sent': ...}}] ({exc})"
            ) from exc
        if not found:
            raise ValueError(f"{path}: holds no sentence to train the tokenizer on")
        sentences += found
    return sentences


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a tiny LLaVA + SAM base (random weights) for CPU runs.")
    p.add_argument("--out", required=True, help="output folder (gets llava/ and sam_tiny.pth)")
    p.add_argument("--dataset_dir", default="./dataset", help="root holding refer_seg/<ds>/<ds>.json")
    p.add_argument("--ds", default="ref-urbanlf-syn", help="dataset name(s), '||'-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sam_pretrain_steps",
        type=int,
        default=0,
        help="pretrain the tiny SAM on train-split point prompts for N steps (stands in for SAM's own "
        "pretraining; 0 = random SAM)",
    )
    p.add_argument("--sam_pretrain_lr", type=float, default=SamPretrainOptions.lr)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Entry point; returns ``{"llava": dir, "sam": path}``."""
    args = build_parser().parse_args(argv)
    corpus = dataset_sentences(args.dataset_dir, args.ds)
    pretrain = SamPretrainOptions(steps=args.sam_pretrain_steps, lr=args.sam_pretrain_lr)
    objects = train_split_objects(args.dataset_dir, args.ds) if pretrain.steps > 0 else None
    paths = write_tiny_base(args.out, corpus, seed=args.seed, sam_objects=objects, sam_pretrain=pretrain)
    print(f"tokenizer trained on {len(corpus)} sentences")
    if objects:
        done = json.loads((Path(args.out) / "sam_pretrain.json").read_text())
        print(
            f"tiny SAM pretrained {pretrain.steps} steps on {len(objects)} train images: point-prompt loss "
            f"{done['first_loss']:.3f} -> {done['loss']:.3f}, train mask IoU {done['first_iou']:.3f} -> "
            f"{done['iou']:.3f}"
        )
    print(f"--version {paths['llava']} --vision_pretrained {paths['sam']}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
