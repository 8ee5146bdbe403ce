"""Checks that run before a model is built: the base weights are what they claim, the splits select
something, and every scene the run reads is complete and well-formed (all problems reported at once).

Besides the files (``dataset.check``): every annotation a ref points at covers at least one pixel of its
image; ``--model_max_length`` cannot let a conversation run past the model's positions; and the disparity
of a sample of scenes aligns their views (a neighbour warped to the centre with it, by CAAM's own
``model.caam.warp_to_center``, matches the centre better than with zero disparity), so a depth map in
metres or a map of the opposite sign is refused before hours of training on it.

``train_ds.py`` calls :func:`preflight` on every rank; rank 0 checks the files (with a tqdm bar) and
shares the verdict, so a bad scene stops the run in seconds instead of hours in.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from dataset.attributes import load_attributes
from dataset.check import Problem, check_annotations, check_datasets, report
from dataset.errors import AnnotationError, DataError
from dataset.lightfield import LightFieldLayout, load_light_field, read_disparity
from dataset.scenes import SceneDataset
from dataset.tasks.base import contract_problem
from model.build import check_pretrained_dir
from model.caam import warp_to_center
from model.options import ModelOptions
from training.config import RunConfig, parse_config
from training.loaders import scene_layouts, train_scenes, val_scenes
from training.task_mix import task_parts
from utils import distributed
from utils.views import NEIGHBOURHOODS, Offset, parse_views

#: Scenes whose disparity must align their views: evenly spaced over the scenes the run reads.
DISPARITY_SAMPLE = 8
#: How much worse than zero disparity a map may match the centre before it is refused: ``ALIGN_SLACK``
#: grey levels (0-255) plus ``ALIGN_SLACK_REL`` of the zero-disparity error. In a scene without parallax
#: the two errors are equal up to bilinear interpolation; a depth map shifts pixels by many px.
ALIGN_SLACK, ALIGN_SLACK_REL = 0.25, 0.05


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


def tasks_problem(
    cfg: RunConfig, views: Sequence[tuple[int, int]], refer: Callable[[], SceneDataset]
) -> str | None:
    """The other tasks of ``--dataset``: each reader is built (it checks its folders and annotation files,
    naming the file, before any model is), must hold training items, and its first item must follow the
    task contract (:func:`dataset.tasks.base.contract_problem`). None when ``--dataset`` is ``refer_seg``."""
    if cfg.datasets.tasks == ["refer_seg"]:
        return None
    parts = task_parts(cfg, refer, lambda names: scene_layouts(cfg.data, names), views, 0, False, True)
    lines = []
    for task, data in parts:
        if task == "refer_seg":
            continue
        if len(data) == 0:
            lines.append(f"--{task}_data {cfg.datasets.task_data(task)!r}: no training item")
            continue
        why = contract_problem({**data[0], "task": task})
        if why:
            lines.append(
                f"--{task}_data {cfg.datasets.task_data(task)!r}: its first item is malformed: {why}"
            )
    return "\n".join(lines) or None


def gres_problem(cfg: RunConfig, scenes: SceneDataset, check_version: bool = True) -> str | None:
    """Why the training data cannot train this model: it holds expressions with no target (gRefCOCO's
    ``ann_id: [-1]``) and the model has no ``[REJ]`` to answer them (``--gres``); None otherwise."""
    empty = [(ref.ref_id, ds) for scene in scenes.scenes for ref in scene.refs if ref.no_target
             for ds in (scenes.names[scene.ds_index],)]  # fmt: skip
    if not empty:
        return None
    version = Path(cfg.run.version)
    recorded = False
    if (check_version or version.is_dir()) and (version / "config.json").is_file():
        recorded = bool(json.loads((version / "config.json").read_text()).get("gres", False))
    if cfg.model.gres or recorded:
        return None
    ref_id, ds = empty[0]
    return (
        f"--refer_seg_data {cfg.datasets.refer_seg_data!r}: {len(empty)} training ref(s) name no object (e.g. "
        f"ref_id {ref_id} of {ds}: ann_id [-1]); only a model with a [REJ] token can learn to answer them: "
        "add --gres"
    )


def ilvc_problem(cfg: RunConfig) -> str | None:
    """Why ``--ilvc`` cannot describe the training targets: a ``--refer_seg_data`` dataset without a readable
    ``attributes.json`` (the message names the file); None otherwise or without ``--ilvc``."""
    if cfg.datasets.ilvc <= 0:
        return None
    for ds in cfg.datasets.names:
        try:
            load_attributes(cfg.datasets.dataset_dir, ds.split("(", 1)[0])
        except AnnotationError as exc:
            return f"--ilvc {cfg.datasets.ilvc} describes each target from its attributes: {exc}"
    return None


def positions_problem(cfg: RunConfig, check_version: bool = True) -> str | None:
    """Why ``--model_max_length`` lets a conversation run past the positions of ``--version``'s language
    model (``max_position_embeddings``), or None. A conversation is cut at ``model_max_length`` tokens
    with each ``<image>`` / ``<depth>`` placeholder counted once, and each then expands to the model's
    ``image_seq_length`` visual tokens, so it may reach ``model_max_length + placeholders * (visual - 1)``
    positions. None when ``--version`` is not a folder (``scripts/check_dataset.py`` without weights)."""
    version = cfg.run.version
    if not (check_version or Path(version).is_dir()):
        return None
    kind = check_pretrained_dir(version)
    config = AutoConfig.from_pretrained(version)
    text = getattr(config, "text_config", None) or config
    positions = getattr(text, "max_position_embeddings", None)
    visual = int(getattr(config, "image_seq_length", 0) or 0)
    if not positions or not visual:
        return None
    use_depth = config.use_depth if kind == "lfllm" else cfg.model.use_depth
    placeholders = 2 if use_depth else 1
    limit = cfg.prompt.model_max_length
    reach = limit + placeholders * (visual - 1)
    if reach <= positions:
        return None
    return (
        f"--model_max_length {limit}: a conversation may reach {reach} positions ({limit} tokens, each of "
        f"its {placeholders} <image>/<depth> placeholder(s) then expanding to {visual} visual tokens), "
        f"beyond the {positions} positions of the model (max_position_embeddings of {version}); use "
        f"--model_max_length {positions - placeholders * (visual - 1)} or less"
    )


@torch.no_grad()
def alignment_errors(
    center: np.ndarray, views: np.ndarray, offsets: Sequence[Offset], disparity: np.ndarray
) -> tuple[float, float]:
    """(error with ``disparity``, error with zero disparity): the mean absolute difference, in grey levels
    (0-255, the channel mean), between the centre (H, W, 3) and the neighbours ``views`` (V, H, W, 3) at
    ``offsets`` warped to it by CAAM's warp (:func:`model.caam.warp_to_center`; zero disparity leaves
    them as they are), over the pixels the disparity's warp samples inside the views (``inf`` when there
    is none)."""
    grey_c = torch.from_numpy(np.ascontiguousarray(center)).float().mean(-1)  # (H, W)
    grey_v = torch.from_numpy(np.ascontiguousarray(views)).float().mean(-1)  # (V, H, W); the warp is linear
    d = torch.from_numpy(np.ascontiguousarray(disparity, dtype=np.float32))[None]
    warped, valid = warp_to_center(grey_v[None, :, None], d, offsets)
    weight = valid[0, :, 0].float()  # (V, H, W)
    count = float(weight.sum())
    if count == 0:
        return math.inf, float((grey_v - grey_c).abs().mean())
    err = float(((warped[0, :, 0] - grey_c).abs() * weight).sum()) / count
    err0 = float(((grey_v - grey_c).abs() * weight).sum()) / count
    return err, err0


def check_alignment(
    scene_dir: Path, layout: LightFieldLayout, views: Sequence[Offset] = ()
) -> tuple[Problem | None, bool]:
    """(the problem, whether it was checked) of one scene's disparity: refused when warping the neighbours
    ``views`` (default: the four direct ones that exist) to the centre with it matches the centre worse
    than zero disparity does (see :data:`ALIGN_SLACK`). Not checked when the scene has no such neighbour,
    or its files do not read (the file check reports those)."""
    candidates = [tuple(o) for o in (views or NEIGHBOURHOODS["4"])]
    offsets = [o for o in candidates if (scene_dir / layout.view_name(o)).is_file()]
    path = scene_dir / layout.disparity_name
    if not offsets or not path.is_file():
        return None, False
    try:
        sample = load_light_field(scene_dir, tuple(offsets), layout, with_disparity=False)
        disparity = read_disparity(path, sample.center.shape[:2])
    except DataError:
        return None, False
    err, err0 = alignment_errors(sample.center, sample.views, offsets, disparity)
    if err <= err0 * (1 + ALIGN_SLACK_REL) + ALIGN_SLACK:
        return None, True
    names = ", ".join(Path(layout.view_name(o)).stem for o in offsets)
    return Problem(
        path,
        f"scene {scene_dir.name}: this disparity does not align the views: warped to the centre with it, "
        f"{names} differ from {Path(layout.view_name((0, 0))).stem} by {err:.2f} grey levels on average, "
        f"more than the {err0:.2f} with zero disparity (no warp at all). It is not a disparity in px "
        "between adjacent views (larger = nearer, docs/DATA.md §2): a depth map must be converted to "
        "disparity first, and a map of the opposite sign negated",
    ), True


def check_disparity_alignment(
    groups: Sequence[SceneDataset], sample: int = DISPARITY_SAMPLE
) -> tuple[int, list[Problem]]:
    """:func:`check_alignment` on ``sample`` light-field scenes evenly spaced over ``groups`` (with the
    neighbours their model reads, or the four direct ones). Returns (scenes checked, problems)."""
    scenes: dict[Path, tuple[LightFieldLayout, tuple[Offset, ...]]] = {}
    for group in groups:
        for i, scene in enumerate(group.scenes):
            if group.sources[scene.ds_index] == "lightfield":
                scenes.setdefault(group.scene_path(i), (group.layouts[scene.ds_index], group.offsets))
    items = list(scenes.items())
    if len(items) > sample:
        items = (
            [items[round(k * (len(items) - 1) / (sample - 1))] for k in range(sample)] if sample > 1 else []
        )
    checked, problems = 0, []
    for path, (layout, views) in items:
        problem, done = check_alignment(path, layout, views)
        checked += done
        if problem is not None:
            problems.append(problem)
    return checked, problems


def preflight(cfg: RunConfig, *, train: bool, is_main: bool, check_version: bool = True) -> dict[str, Any]:
    """Refuse a run that cannot succeed, before the model is built.

    Checks ``--version`` (``model.build.check_pretrained_dir``), that the training split (``train``)
    and the validation split (when validating) select expressions, that ``--model_max_length`` stays
    within the model's positions (:func:`positions_problem`), every scene they read (``dataset.check``:
    files, decodable headers, sizes, disparity dtype/shape/range; the disparity is skipped with
    ``--depth_source estimate``, whose maps are written afterwards), every annotation their refs point at
    (``dataset.check.check_annotations``: not empty), and that the disparity of a sample of scenes aligns
    their views (:func:`check_disparity_alignment`; estimated maps when a previous run wrote them).

    Returns a summary (scenes checked, scenes whose disparity alignment was checked). Raises ``DataError`` / ``ValueError`` / ``FileNotFoundError``
    with every problem listed.
    """
    views, need_disparity = model_inputs(cfg.run.version, cfg.model, check_version)
    groups: list[SceneDataset] = []
    problems = []
    refer = train and "refer_seg" in cfg.datasets.tasks
    if refer:
        scenes = train_scenes(cfg, views, with_disparity=False)
        problems.append(split_problem(scenes, "--refer_seg_data", cfg.datasets.refer_seg_data))
        groups.append(scenes)
    if train:
        problems.append(tasks_problem(cfg, views, lambda: train_scenes(cfg, views, with_disparity=False)))
    if cfg.run.eval_only or not cfg.eval.no_eval:
        scenes = val_scenes(cfg, with_disparity=False, views=views)
        if isinstance(scenes, SceneDataset):  # a reasoning set is checked by its reader as it is built
            problems.append(split_problem(scenes, "--val_dataset", cfg.eval.val_dataset))
            groups.append(scenes)
        elif len(scenes) == 0:
            problems.append(f"--val_dataset {cfg.eval.val_dataset!r}: no query in that split")
    if refer:
        problems.append(gres_problem(cfg, groups[0], check_version))
        problems.append(ilvc_problem(cfg))
    problems.append(positions_problem(cfg, check_version))
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("\n".join(problems))
    checked, found, aligned = 0, [], 0
    if is_main:
        check_disparity = need_disparity and cfg.data.depth_source == "file"
        checked, found = check_datasets(groups, check_disparity, progress=True)
        found += check_annotations(groups)
        if need_disparity:  # estimated maps too, when a previous run wrote them
            aligned, misaligned = check_disparity_alignment(groups)
            found += misaligned
    verdict = distributed.gather_objects(None if not found else report(found, checked))[0]
    if verdict is not None:
        raise DataError(None, f"pre-flight check of the dataset failed: {verdict}")
    return {"scenes_checked": checked, "disparity_aligned": aligned}


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
    aligned = summary["disparity_aligned"]
    extra = f" (the disparity of {aligned} aligns their views)" if aligned else ""
    print(f"ok: {summary['scenes_checked']} scene(s) checked{extra}, no problem found")
    return 0
