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
from dataclasses import asdict, dataclass
from pathlib import Path

from dataset.lightfield import LightFieldLayout
from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.generator import write_dataset
from utils.options import add_option_flags, option, options_from_args
from utils.views import NEIGHBOURHOODS

COMMAND = "python scripts/make_demo_examples.py --out examples"


@dataclass(frozen=True)
class ExamplesOptions:
    """The command line of ``scripts/make_demo_examples.py`` (defaults: the bundled ``examples/``)."""

    out: str = option("examples", "folder receiving Image<id>/ and examples.json")
    num_scenes: int = option(2, "validation scenes written")
    seed: int = option(7, "generator seed (one the quickstart does not train on)")


def write_examples(
    out_dir: str | Path,
    *,
    num_scenes: int = ExamplesOptions.num_scenes,
    height: int = 120,
    width: int = 160,
    seed: int = ExamplesOptions.seed,
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


def parse_args(argv: Sequence[str] | None = None) -> ExamplesOptions:
    """The command line as :class:`ExamplesOptions`."""
    parser = argparse.ArgumentParser(description="Write the web demo's bundled example light fields.")
    add_option_flags(parser, ExamplesOptions)
    return options_from_args(ExamplesOptions, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI of :func:`write_examples`."""
    options = parse_args(argv)
    record = write_examples(options.out, num_scenes=options.num_scenes, seed=options.seed)
    print(f"wrote {len(record['scenes'])} scenes to {options.out}")
    return record
