"""Data loaders for training (seeded per epoch and rank, so a resumed run sees the same batches) and
validation (a disjoint shard per rank, every scene exactly once)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from dataset.collate import TokenSpec, collate_batch
from dataset.lightfield import LightFieldLayout
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.scenes import SceneDataset


class EpochSampler(Sampler[int]):
    """``num_samples`` indices drawn by permutations of ``range(n)``, seeded by (seed, epoch, rank)."""

    def __init__(self, n: int, num_samples: int, seed: int, rank: int) -> None:
        if n == 0:
            raise ValueError("the training split has no scenes")
        self.n, self.num_samples, self.seed, self.rank, self.epoch = n, num_samples, seed, rank, 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``'s order; skip its first ``start`` samples (a run resumed mid-epoch)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        out: list[int] = []
        while len(out) < self.num_samples:
            out += torch.randperm(self.n, generator=g).tolist()
        return iter(out[self.start : self.num_samples])


def layout_from_args(args: argparse.Namespace) -> LightFieldLayout:
    """Light-field file names chosen on the command line."""
    return LightFieldLayout(view_pattern=args.view_pattern, disparity_name=args.disparity_name)


def _tokens(tokenizer, config, args) -> TokenSpec:
    return TokenSpec.from_tokenizer(tokenizer, config.image_seq_length, args.model_max_length)


def build_train_loader(args, config, tokenizer, rank: int) -> tuple[DataLoader, EpochSampler]:
    """Loader of ``steps_per_epoch × grad_accumulation_steps`` micro-batches per epoch on this rank."""
    spec = SampleSpec.from_model_config(config, args.conv_type, pack=args.pack_conversations)
    scenes = SceneDataset(
        args.dataset_dir,
        args.refer_seg_data,
        "train",
        views=[tuple(o) for o in (config.caam_offsets or [])],
        layout=layout_from_args(args),
        mode="train",
        num_classes_per_sample=args.num_classes_per_sample,
        with_disparity=spec.needs_disparity,
        seed=args.seed + rank,
    )
    data = ReferSegDataset(
        scenes, tokenizer, spec, _tokens(tokenizer, config, args), train=True, seed=args.seed
    )
    n = args.steps_per_epoch * args.grad_accumulation_steps * args.batch_size
    sampler = EpochSampler(len(data), n, args.seed, rank)
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=partial(collate_batch, pad_id=tokenizer.pad_token_id),
        drop_last=True,
    )
    return loader, sampler


def val_scenes(args: argparse.Namespace, with_disparity: bool, views=()) -> SceneDataset:
    """The raw validation scenes of ``--val_dataset`` (``ds|splitBy|split``; split may be a subset tag)."""
    ds, split_by, split = args.val_dataset.split("|")
    return SceneDataset(
        args.dataset_dir,
        ds,
        split,
        views=views,
        layout=layout_from_args(args),
        mode="val",
        with_disparity=with_disparity,
        split_by=split_by,
    )


def build_val_loader(args, config, tokenizer, rank: int, world: int, generated: bool = False) -> DataLoader:
    """Validation loader over this rank's shard of ``--val_dataset`` (``ds|splitBy|split``)."""
    spec = SampleSpec.from_model_config(config, args.conv_type, pack=False)
    scenes = val_scenes(args, spec.needs_disparity, [tuple(o) for o in (config.caam_offsets or [])])
    data = ReferSegDataset(
        scenes, tokenizer, spec, _tokens(tokenizer, config, args), train=False, with_answers=not generated
    )
    shard = Subset(data, list(range(rank, len(data), world)))
    return DataLoader(
        shard,
        batch_size=args.val_batch_size,
        shuffle=False,
        num_workers=min(args.workers, 2),
        collate_fn=partial(collate_batch, pad_id=tokenizer.pad_token_id),
    )
