"""Data loaders for training (seeded per epoch and rank, so a resumed run sees the same batches) and
validation (a disjoint shard per rank, every scene exactly once)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, Subset

from dataset.collate import TokenSpec, collate_batch
from dataset.disparity.cache import Estimator, estimate_scenes, scenes_to_estimate
from dataset.errors import LightFieldError
from dataset.lightfield import LightFieldLayout
from dataset.options import DataOptions, PromptOptions
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.regions import IlvcSpec, RegionDescriber
from dataset.scenes import SceneDataset, split_datasets
from dataset.tasks.mix import TaskMix
from dataset.tasks.reason_seg import ReasonSegDataset
from training.config import RunConfig
from training.task_mix import build_task_mix
from utils import distributed


class EpochSampler(Sampler[int]):
    """``num_samples`` indices drawn by permutations of ``range(n)``, seeded by (seed, epoch, rank).

    With ``groups`` (one list of indices per dataset) and unequal ``weights`` (``--sample_rates``), each
    draw first picks a dataset with probability proportional to its weight, then the next index of that
    dataset's own permutation stream; equal weights (the default) give the plain permutations, unless
    ``by_group`` (a task mix: equal task rates still draw each task equally often, whatever its size)."""

    def __init__(
        self,
        n: int,
        num_samples: int,
        seed: int,
        rank: int,
        groups: list[list[int]] | None = None,
        weights: list[float] | None = None,
        by_group: bool = False,
    ) -> None:
        if n == 0:
            raise ValueError("the training split has no scenes")
        self.n, self.num_samples, self.seed, self.rank, self.epoch = n, num_samples, seed, rank, 0
        self.start = 0
        weighted = groups is not None and weights is not None and (by_group or len(set(weights)) > 1)
        self.groups = [g for g in groups] if weighted else None
        self.weights = torch.tensor(weights, dtype=torch.float64) if weighted else None
        if self.groups is not None and any(not g for g in self.groups):
            raise ValueError("--sample_rates: a dataset of --refer_seg_data has no training scene")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``'s order; skip its first ``start`` samples (a run resumed mid-epoch)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        if self.groups is None:
            out: list[int] = []
            while len(out) < self.num_samples:
                out += torch.randperm(self.n, generator=g).tolist()
            return iter(out[self.start : self.num_samples])
        picks = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        streams: list[list[int]] = [[] for _ in self.groups]
        out = []
        for k in picks:
            if not streams[k]:
                order = torch.randperm(len(self.groups[k]), generator=g).tolist()
                streams[k] = [self.groups[k][i] for i in reversed(order)]
            out.append(streams[k].pop())
        return iter(out[self.start :])


def layout_for(data: DataOptions, ds: str | None = None) -> LightFieldLayout:
    """Light-field file names of dataset ``ds``: the disparity file is ``--disparity_name`` (its entry for
    ``ds``), or ``--estimated_disparity_name`` with ``--depth_source estimate``."""
    kwargs = {}
    if ds is not None:
        kwargs["scene_pattern"] = data.scene_root_and_pattern(ds)[1]
    return LightFieldLayout(
        view_pattern=data.view_pattern, disparity_name=data.read_disparity_name(ds), **kwargs
    )


def scene_layouts(data: DataOptions, datasets: str) -> dict[str, Any]:
    """``SceneDataset`` keyword arguments ``layout`` and ``lf_root``, one entry per dataset of
    ``datasets`` (``a||b``), from ``--view_pattern``, ``--disparity_name``, ``--lf_dir_pattern``."""
    names = [name.split("(", 1)[0] for name in split_datasets(datasets)]
    return {
        "layout": {ds: layout_for(data, ds) for ds in names},
        "lf_root": {ds: data.scene_root_and_pattern(ds)[0] for ds in names},
    }


def _layouts(cfg: RunConfig) -> Any:
    """``datasets -> SceneDataset-style layout kwargs`` of this run (for the task readers)."""
    return lambda datasets: scene_layouts(cfg.data, datasets)


def train_scenes(
    cfg: RunConfig,
    views: Sequence[tuple[int, int]] = (),
    *,
    rank: int | None = None,
    with_disparity: bool = True,
    with_pixels: bool = True,
) -> SceneDataset:
    """The raw scenes of the training split of ``--refer_seg_data``: the one builder of the training scene
    set. ``rank`` given: the loop's sampling (``--num_classes_per_sample`` expressions drawn per scene,
    seeded by ``--seed`` + rank); else every expression of a scene once (cache filling, checks)."""
    sampling: dict[str, Any] = {"mode": "val"}
    if rank is not None:
        sampling = {
            "mode": "train",
            "num_classes_per_sample": cfg.loop.num_classes_per_sample,
            "seed": cfg.loop.seed + rank,
        }
    return SceneDataset(
        cfg.datasets.dataset_dir,
        cfg.datasets.refer_seg_data,
        "train",
        views=list(views),
        **scene_layouts(cfg.data, cfg.datasets.refer_seg_data),
        with_disparity=with_disparity,
        with_pixels=with_pixels,
        **sampling,
    )


def used_scene_dirs(cfg: RunConfig, train: bool, val: bool) -> list[Path]:
    """Light-field scene folders of the training split (``--refer_seg_data``, split ``train``) and/or of
    ``--val_dataset``, in dataset order without duplicates; 2D (image) datasets have none."""
    groups: list[SceneDataset] = []
    if train:
        groups.append(train_scenes(cfg))
    if val:
        groups.append(val_scenes(cfg, with_disparity=False))
    dirs: dict[Path, None] = {}
    for scenes in groups:
        if not isinstance(
            scenes, SceneDataset
        ):  # a reasoning set: its light-field scenes are the refer set's
            continue
        for i, scene in enumerate(scenes.scenes):
            if scenes.sources[scene.ds_index] == "lightfield":
                dirs.setdefault(scenes.scene_path(i), None)
    return list(dirs)


def prepare_estimated_disparity(
    cfg: RunConfig,
    *,
    train: bool,
    val: bool,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    estimator: Estimator | None = None,
) -> int:
    """With ``--depth_source estimate``: write ``--estimated_disparity_name`` into every scene folder of the
    splits used (:func:`used_scene_dirs`) that lacks it, before the datasets are built.

    Call it on every rank (it is collective when a process group exists): rank 0's list of missing scenes
    is shared, the ranks estimate disjoint shares of it (rank ``r`` takes every ``world_size``-th scene,
    on ``--disparity_device`` or else ``device``), files are written atomically, and every rank returns
    once all are written, or raises the same error. Without a process group (one rank) it just runs.

    Returns:
        The number of files this rank wrote (0 with ``--depth_source file``).

    Raises:
        DataError naming the file (a missing scene folder or view, a bad view) on the rank that met it,
        and ``RuntimeError`` with that message on the other ranks; ``LightFieldError`` when a written
        file is not visible to a rank (nodes without a shared filesystem: run
        ``scripts/estimate_disparity.py`` on each node first).
    """
    if cfg.data.depth_source != "estimate":
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        rank, world_size = 0, 1
    out_name = cfg.data.estimated_disparity_name
    scenes = used_scene_dirs(cfg, train, val)
    # a collective before anyone writes: every rank gets rank 0's list, so the shares are consistent
    todo = distributed.gather_objects(scenes_to_estimate(scenes, out_name))[0]
    if show_progress:
        print(
            f"--depth_source estimate: {len(scenes) - len(todo)} of {len(scenes)} scenes have {out_name}; "
            f"estimating {len(todo)} on {world_size} rank(s)",
            flush=True,
        )
    written, error = 0, None
    run_on = torch.device(cfg.datasets.disparity_device or device)
    try:
        written = estimate_scenes(
            todo[rank::world_size],
            out_name,
            layout_for(cfg.data),
            cfg.datasets.disparity_config(),
            device=str(run_on),
            estimator=estimator,
            progress=show_progress and bool(todo),
        )
    except Exception as exc:  # reported to every rank below, so none waits for the others forever
        error = exc
    # the barrier after writing; messages, not exceptions, travel (DataError does not unpickle)
    reports = distributed.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(reports) if message is not None]
    if failed:
        raise RuntimeError(f"--depth_source estimate failed on rank {failed[0][0]}: {failed[0][1]}")
    if written and run_on.type == "cuda":
        torch.cuda.empty_cache()  # once, before the model's step: give the estimator's blocks back
    for scene in todo:
        if not (scene / out_name).is_file():
            raise LightFieldError(
                scene / out_name,
                f"estimated disparity not found on rank {rank} after estimation; ranks on several nodes "
                "need a shared filesystem, or run scripts/estimate_disparity.py on every node first",
            )
    return written


def _tokens(tokenizer: Any, model_config: Any, prompt: PromptOptions) -> TokenSpec:
    return TokenSpec.from_tokenizer(tokenizer, model_config.image_seq_length, prompt.model_max_length)


def caam_views(model_config: Any) -> list[tuple[int, int]]:
    """The neighbour views the model reads (its CAAM offsets; none without CAAM)."""
    return [tuple(o) for o in (model_config.caam_offsets or [])]


def ilvc_spec(cfg: RunConfig, model_config: Any, spec: SampleSpec) -> IlvcSpec | None:
    """The ILVC answers of this run's training set (``--ilvc``, ``--ilvc_crop``), or None when off. Reads
    every ``--refer_seg_data`` dataset's ``attributes.json`` (a missing one raises naming the file)."""
    d = cfg.datasets
    if d.ilvc <= 0:
        return None
    if d.ilvc_crop == "caam" and not spec.caam_clip:
        raise ValueError(
            "--ilvc_crop caam: this model's CLIP branch sees no CAAM-aggregated view; use centre"
        )
    size = int(model_config.vision_config.image_size)
    return IlvcSpec(d.ilvc, d.ilvc_crop, size, RegionDescriber(d.dataset_dir, d.names))


def build_train_loader(
    cfg: RunConfig, model_config: Any, tokenizer: Any, rank: int, store: Any = None
) -> tuple[DataLoader, EpochSampler]:
    """Loader of ``steps_per_epoch × grad_accumulation_steps`` micro-batches per epoch on this rank.

    ``store`` (a ``training.features.FeatureStore``): the scenes' encodings come from the feature cache
    and no image is read."""
    spec = SampleSpec.from_model_config(
        model_config,
        cfg.prompt.conv_type,
        pack=cfg.loop.pack_conversations,
        exprs_per_question=cfg.loop.exprs_per_question,
    )
    views = caam_views(model_config)

    def refer() -> SceneDataset:
        return train_scenes(
            cfg, views, rank=rank, with_disparity=spec.needs_disparity, with_pixels=store is None
        )

    mixed = cfg.datasets.tasks != ["refer_seg"]
    if mixed:
        flat = spec.needs_disparity or spec.caam_clip or spec.caam_sam
        items: Any = build_task_mix(
            cfg, refer, _layouts(cfg), views, rank, spec.needs_disparity, store is None, flat_2d=flat
        )
        groups, weights = items.groups()
    else:
        items = refer()
        groups = [
            [i for i, sc in enumerate(items.scenes) if sc.ds_index == d] for d in range(len(items.names))
        ]
        weights = cfg.datasets.sample_weights()
    features = None
    if store is not None:
        features = store.provider(refer() if mixed else items, spec)
    data = ReferSegDataset(
        items,
        tokenizer,
        spec,
        _tokens(tokenizer, model_config, cfg.prompt),
        train=True,
        seed=cfg.loop.seed,
        features=features,
        explanatory=cfg.datasets.explanatory,
        ilvc=ilvc_spec(cfg, model_config, spec),
    )
    sampler = EpochSampler(
        len(data), cfg.loop.samples_per_epoch, cfg.loop.seed, rank, groups, weights, by_group=mixed
    )
    loader = DataLoader(
        data,
        batch_size=cfg.loop.batch_size,
        sampler=sampler,
        num_workers=cfg.loop.workers,
        collate_fn=partial(collate_batch, pad_id=tokenizer.pad_token_id),
        drop_last=True,
    )
    return loader, sampler


def val_scenes(
    cfg: RunConfig,
    with_disparity: bool,
    views: Sequence[tuple[int, int]] = (),
    with_pixels: bool = True,
    probe: str = "exact",
) -> SceneDataset | ReasonSegDataset:
    """The raw validation scenes of ``--val_dataset`` (``ds|splitBy|split``; split may be a subset tag);
    ``probe``: what their light-field input is replaced with (``--eval_input``, ``SceneDataset``). A
    reasoning set (``name|split``) gives a :class:`dataset.tasks.reason_seg.ReasonSegDataset` (every query of
    every target; exact inputs only)."""
    ds, split_by, split = cfg.eval.split
    if cfg.eval.reasoning:
        if probe != "exact":
            raise ValueError(
                f"--eval_input {probe}: the probes apply to referring val sets, not {ds}|{split}"
            )
        return ReasonSegDataset(
            cfg.datasets.dataset_dir,
            ds,
            split,
            mode="val",
            views=list(views),
            with_disparity=with_disparity,
            with_pixels=with_pixels,
            **scene_layouts(cfg.data, ds),
        )
    return SceneDataset(
        cfg.datasets.dataset_dir,
        ds,
        split,
        views=views,
        **scene_layouts(cfg.data, ds),
        mode="val",
        with_disparity=with_disparity,
        split_by=split_by,
        with_pixels=with_pixels,
        probe=probe,
    )


def build_val_loader(
    cfg: RunConfig,
    model_config: Any,
    tokenizer: Any,
    rank: int,
    world: int,
    generated: bool = False,
    store: Any = None,
) -> DataLoader:
    """Validation loader over this rank's shard of ``--val_dataset`` (``ds|splitBy|split``); with
    ``store`` the encodings come from the feature cache."""
    spec = SampleSpec.from_model_config(model_config, cfg.prompt.conv_type, pack=False)
    scenes = val_scenes(
        cfg,
        spec.needs_disparity,
        caam_views(model_config),
        with_pixels=store is None,
        probe=cfg.eval.eval_input,
    )
    features = None if store is None else store.provider(scenes, spec)
    if cfg.eval.reasoning and (spec.needs_disparity or spec.caam_clip or spec.caam_sam):
        views = caam_views(model_config)  # ReasonSeg's 2D images become flat light fields
        scenes = TaskMix(
            [("reason_seg", scenes)], [1.0], [[1.0] * len(scenes.names)], views, True, spec.needs_disparity
        )
    data = ReferSegDataset(
        scenes,
        tokenizer,
        spec,
        _tokens(tokenizer, model_config, cfg.prompt),
        train=False,
        with_answers=not generated,
        features=features,
    )
    shard = Subset(data, list(range(rank, len(data), world)))
    return DataLoader(
        shard,
        batch_size=cfg.eval.val_batch_size,
        shuffle=False,
        num_workers=min(cfg.loop.workers, 2),
        collate_fn=partial(collate_batch, pad_id=tokenizer.pad_token_id),
    )
