"""Checks that run before a model is built: the base weights are what they claim, the splits select
something, and every scene the run reads is complete and well-formed (all problems reported at once).

``train_ds.py`` calls :func:`preflight` on every rank; rank 0 checks the files (with a tqdm bar) and
shares the verdict, so a bad scene stops the run in seconds instead of hours in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from dataset.check import check_datasets, report
from dataset.errors import DataError
from dataset.scenes import SceneDataset
from model.build import check_pretrained_dir
from model.options import ModelOptions
from training.config import RunConfig, parse_config
from training.loaders import train_scenes, val_scenes
from utils import distributed
from utils.views import parse_views


def model_inputs(
    version: str, options: ModelOptions, check_version: bool = True
) -> tuple[tuple[tuple[int, int], ...], bool]:
    """(neighbour offsets, whether a disparity map is read) of the model ``--version`` will give: from a
    merged model's config, else from the command line's model options (``check_version=False``: the
    options alone when ``--version`` is not a folder, as ``scripts/check_dataset.py`` allows)."""
    merged = False
    if check_version or Path(version).is_dir():
        merged = check_pretrained_dir(version) == "lfllm"
    if merged:
        cfg = AutoConfig.from_pretrained(version)
        use_caam, use_depth, offsets = cfg.use_caam, cfg.use_depth, cfg.caam_offsets or []
    else:
        use_caam, use_depth, offsets = options.use_caam, options.use_depth, parse_views(options.caam_views)
    views = tuple(tuple(o) for o in offsets) if use_caam else ()
    return views, bool(use_caam or use_depth)


def split_problem(scenes: SceneDataset, flag: str, value: str) -> str | None:
    """Why ``scenes`` (one split of ``value``) is empty, listing what its data can select; None if not."""
    if scenes.num_expressions:
        return None
    present = []
    for ann in scenes.annotations:
        present += [s for s in ann.selectors_present() if s not in present]
    return (
        f"{flag} {value!r}: split {scenes.split!r} selects 0 expressions in {', '.join(scenes.names)}; "
        f"the data has splits and subset tags: {', '.join(present) or 'none'}"
    )


def preflight(cfg: RunConfig, *, train: bool, is_main: bool, check_version: bool = True) -> dict[str, Any]:
    """Refuse a run that cannot succeed, before the model is built.

    Checks ``--version`` (``model.build.check_pretrained_dir``), that the training split (``train``)
    and the validation split (when validating) select expressions, and every scene they read
    (``dataset.check``: files, decodable headers, sizes, disparity dtype/shape/range; the disparity is
    skipped with ``--depth_source estimate``, whose maps are written afterwards).

    Returns a summary (scenes checked). Raises ``DataError`` / ``ValueError`` / ``FileNotFoundError``
    with every problem listed.
    """
    views, need_disparity = model_inputs(cfg.run.version, cfg.model, check_version)
    groups: list[SceneDataset] = []
    problems = []
    if train:
        scenes = train_scenes(cfg, views, with_disparity=False)
        problems.append(split_problem(scenes, "--refer_seg_data", cfg.datasets.refer_seg_data))
        groups.append(scenes)
    if cfg.run.eval_only or not cfg.eval.no_eval:
        scenes = val_scenes(cfg, with_disparity=False, views=views)
        problems.append(split_problem(scenes, "--val_dataset", cfg.eval.val_dataset))
        groups.append(scenes)
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("\n".join(problems))
    checked, found = 0, []
    if is_main:
        check_disparity = need_disparity and cfg.data.depth_source == "file"
        checked, found = check_datasets(groups, check_disparity, progress=True)
    verdict = distributed.gather_objects(None if not found else report(found, checked))[0]
    if verdict is not None:
        raise DataError(None, f"pre-flight check of the dataset failed: {verdict}")
    return {"scenes_checked": checked}


def check_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/check_dataset.py``: the pre-flight check of ``train_ds.py`` alone, with its flags
    (``--dataset_dir``, ``--refer_seg_data``, ``--val_dataset``, layout, model and ``--eval_only``
    options; ``--version`` is read only when it is a folder). Prints the verdict; status 0 when clean."""
    cfg = parse_config(argv)
    try:
        summary = preflight(cfg, train=not cfg.run.eval_only, is_main=True, check_version=False)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {summary['scenes_checked']} scene(s) checked, no problem found")
    return 0
