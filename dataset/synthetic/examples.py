"""The demo's bundled light fields: a few generated scenes with only the views CAAM reads and the disparity.

    python scripts/make_demo_examples.py --out examples

writes ``<out>/Image<id>/{5_5.png, 5_4.png, 5_6.png, 4_5.png, 6_5.png, 5_5_disparity.npy}`` (the centre,
its 4-neighbourhood, the ground-truth disparity) and ``<out>/examples.json`` (the generator settings, the
command, and per scene a few of its generated expressions). The scenes are validation scenes of a seed the
quickstart does not train on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dataset.lightfield import LightFieldLayout
from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.generator import write_dataset
from utils.views import NEIGHBOURHOODS

COMMAND = "python scripts/make_demo_examples.py --out examples"


def write_examples(
    out_dir: str | Path,
    *,
    num_scenes: int = 2,
    height: int = 120,
    width: int = 160,
    seed: int = 7,
    expressions_per_scene: int = 3,
) -> dict:
    """Generate ``num_scenes`` validation scenes and keep the centre, its 4 neighbours and the disparity.

    Returns the ``examples.json`` record (also written to ``out_dir``).
    """
    out = Path(out_dir)
    cfg = SyntheticConfig(height=height, width=width, num_train=0, num_val=num_scenes, seed=seed)
    layout = LightFieldLayout(disparity_name=cfg.disparity_name)
    keep = [layout.view_name((0, 0)), *(layout.view_name(o) for o in NEIGHBOURHOODS["4"])]
    scenes = []
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, cfg)
        refs = json.loads((Path(tmp) / "refer_seg" / cfg.ds_name / f"{cfg.ds_name}.json").read_text())
        for image_id in range(1, num_scenes + 1):
            src = Path(tmp) / "lf" / cfg.ds_name / layout.scene_name(image_id)
            dst = out / layout.scene_name(image_id)
            dst.mkdir(parents=True, exist_ok=True)
            for name in [*keep, cfg.disparity_name]:
                shutil.copyfile(src / name, dst / name)
            sentences = [r["sentences"][0]["sent"] for r in refs if r["image_id"] == image_id]
            scenes.append({"scene": dst.name, "expressions": sentences[:expressions_per_scene]})
    record = {"command": COMMAND, "generator": asdict(cfg), "views": keep, "scenes": scenes}
    (out / "examples.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI of :func:`write_examples`."""
    p = argparse.ArgumentParser(description="Write the web demo's bundled example light fields.")
    p.add_argument("--out", default="examples", help="folder receiving Image<id>/ and examples.json")
    p.add_argument("--num_scenes", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    record = write_examples(args.out, num_scenes=args.num_scenes, seed=args.seed)
    print(f"wrote {len(record['scenes'])} scenes to {args.out}")
    return record
