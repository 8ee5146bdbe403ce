"""The per-scene feature cache: the frozen front end of LFLLM computed once per scene, not once per step.

With LoRA on the language model only, everything before it is frozen and a function of the scene alone:
the CLIP tower + projector on the (CAAM-aggregated) view and on the depth image, and SAM's image encoder
on the (CAAM-aggregated) view. ``--feature_cache DIR`` stores their outputs per scene —
``image_tokens`` (T, D), ``depth_tokens`` (T, D), ``sam_embeddings`` (C, g, g), exactly what
``LFLLMForCausalLM.encode_frozen`` would compute — and every later step, epoch and validation reads them
instead of decoding and encoding the views.

Never stale: entries live under ``DIR/<key>/`` where the key hashes the frozen weights (content, not
paths), every option that changes the features (sizes, CAAM target/mode/views, depth range, disparity
source and file names, view pattern, compute and storage dtype); each entry also records the size, mtime
and a content hash (blake2b) of the scene's input files and is recomputed when any changes, an edit that
keeps the size and the time stamp included (a process hashes a file once per change of its inode, size,
mtime or ctime: after the first read, one ``stat`` per file and step). Never half-read: entries are written
atomically (temporary file + ``os.replace``) with a checksum of their tensors; a truncated or corrupt
entry is reported, recomputed, never used. Ranks share one cache: rank 0 lists what is missing, each rank
computes its share, all wait for all (the rules of the estimated-disparity cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset.collate import TokenSpec, collate_batch, move_batch
from dataset.options import DataOptions
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.scenes import SceneDataset
from model.lfllm import LFLLMForCausalLM
from training.config import RunConfig
from training.loaders import caam_views, train_scenes, val_scenes
from utils import distributed
from utils.batch import FEATURE_KEYS, STACKED_KEYS

STACKED_IMAGE_KEYS = tuple(k for k in STACKED_KEYS if k not in FEATURE_KEYS)

#: Bump when what an entry holds changes meaning (part of every key).
FORMAT_VERSION = 1
STORAGE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureCacheError(ValueError):
    """A configuration whose front end is not frozen, or not a function of the scene alone."""


def check_cacheable(config: Any) -> None:
    """Refuse, naming the flag, every configuration whose cached outputs would not be frozen features of
    the scene: a learned or occlusion-aware CAAM (its parameters train), a separate depth projector (it
    trains). LoRA never reaches the vision tower (``model.trainable.lora_target_regex``), and the refer-seg
    data path has no image augmentation, so nothing else can make the features vary."""
    if config.use_caam and config.caam_mode != "fixed":
        raise FeatureCacheError(
            f"--feature_cache: --caam_mode {config.caam_mode} trains CAAM's parameters, so the aggregated view "
            "is not frozen; use --caam_mode fixed, or drop --feature_cache"
        )
    if config.use_depth and config.depth_projector != "shared":
        raise FeatureCacheError(
            "--feature_cache: --depth_projector separate trains the projector of the depth tokens; use "
            "--depth_projector shared, or drop --feature_cache"
        )


def _tensor_digest(h: Any, module: torch.nn.Module | None) -> None:
    if module is None:
        return
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def frozen_fingerprint(model: LFLLMForCausalLM) -> str:
    """sha256 of the frozen front end's weights (CLIP tower, projector(s), SAM image encoder, CAAM)."""
    h = hashlib.sha256()
    sam_encoder = None if model.sam is None else model.sam.image_encoder
    for module in (model.model.vision_tower, model.model.multi_modal_projector, model.depth_projector,
                   sam_encoder, model.caam):  # fmt: skip
        _tensor_digest(h, module)
    return h.hexdigest()


def cache_key(
    model: LFLLMForCausalLM,
    spec: SampleSpec,
    data: DataOptions,
    disparity_set: Sequence[str],
    storage: torch.dtype,
) -> str:
    """The folder name of this configuration's entries (see the module docstring)."""
    config = model.config
    record = {
        "format": FORMAT_VERSION,
        "weights": frozen_fingerprint(model),
        "clip_size": spec.clip_size,
        "sam_size": spec.sam_size,
        "use_depth": spec.use_depth,
        "caam_clip": spec.caam_clip,
        "caam_sam": spec.caam_sam,
        "depth_stream": spec.depth_stream,
        "mask_head": config.mask_head,
        "caam_mode": config.caam_mode,
        "caam_offsets": config.caam_offsets,
        "depth_range": list(config.depth_range),
        "clip_mean_std": [list(config.clip_image_mean), list(config.clip_image_std)],
        "vision_feature": [config.vision_feature_layer, config.vision_feature_select_strategy],
        "depth_source": data.depth_source,
        "disparity_name": data.disparity_name,
        "estimated_disparity_name": data.estimated_disparity_name,
        "disparity_set": sorted(disparity_set),
        "view_pattern": data.view_pattern,
        "compute_dtype": str(next(model.model.vision_tower.parameters()).dtype),
        "storage_dtype": str(storage),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


#: This process's content hashes, by (path, inode, size, mtime_ns, ctime_ns): a file is read again only
#: when one of them changes (rewriting a file changes its ctime, even when ``os.utime`` restores mtime).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_DIGESTS_MAX = 1 << 16


def file_digest(path: Path) -> tuple[int, int, str]:
    """(size, mtime_ns, blake2b-128 hex of the content) of ``path``, hashed once per change of the file."""
    st = path.stat()
    memo = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(memo)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[memo] = digest
    return st.st_size, st.st_mtime_ns, digest


def scene_signature(scenes: SceneDataset, index: int, spec: SampleSpec) -> list[list[Any]]:
    """[file name, size, mtime_ns, content hash] of every input file item ``index`` is encoded from
    (:func:`file_digest`): an entry follows the content, not only the size and the time stamp."""
    scene = scenes.scenes[index]
    path = scenes.scene_path(index)
    if scenes.sources[scene.ds_index] != "lightfield":
        files = [path]
    else:
        layout = scenes.layouts[scene.ds_index]
        names = [layout.view_name((0, 0))]
        if spec.caam_clip or spec.caam_sam:
            names += [layout.view_name(tuple(o)) for o in scenes.offsets]
        if spec.needs_disparity:
            names.append(layout.disparity_name)
        files = [path / n for n in names]
    return [[f.name, *file_digest(f)] for f in files]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class FeatureStore:
    """One configuration's entries: ``root/<key>/<ds>/<image_id>.safetensors``."""

    root: Path
    key: str
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    spec: SampleSpec | None = None
    reported: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.root / self.key

    def path(self, ds: str, image_id: Any) -> Path:
        return self.folder / ds / f"{image_id}.safetensors"

    def read(self, ds: str, image_id: Any, signature: list) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (in the compute dtype), or None when it is missing, stale (the scene's
        files changed) or corrupt (reported in ``self.reported``; it will be recomputed)."""
        path = self.path(ds, image_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # a truncated file fails in the header or the data
            self.reported.append(f"{path}: unreadable entry ({type(exc).__name__}), recomputed")
            return None
        if meta.get("checksum") != _checksum(tensors):
            self.reported.append(f"{path}: checksum mismatch, recomputed")
            return None
        if json.loads(meta.get("signature", "null")) != signature:
            return None
        return {k: v.to(self.compute_dtype) for k, v in tensors.items()}

    def write(self, ds: str, image_id: Any, signature: list, tensors: dict[str, torch.Tensor]) -> Path:
        """Write one entry atomically (temporary file in the same folder + ``os.replace``)."""
        path = self.path(ds, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {k: v.detach().to("cpu", self.storage_dtype).contiguous() for k, v in tensors.items()}
        meta = {"signature": json.dumps(signature), "checksum": _checksum(stored)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(stored, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def provider(
        self, scenes: SceneDataset, spec: SampleSpec
    ) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]:
        """``raw scene -> tensors`` for :class:`dataset.refer_seg.ReferSegDataset` (``features=``)."""
        index_of = {(scenes.names[s.ds_index], s.image_id): i for i, s in enumerate(scenes.scenes)}

        def features(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
            index = index_of[(raw["ds"], raw["image_id"])]
            entry = self.read(raw["ds"], raw["image_id"], scene_signature(scenes, index, spec))
            if entry is None:
                raise RuntimeError(
                    f"{self.path(raw['ds'], raw['image_id'])}: feature-cache entry missing or stale during "
                    "the run (a scene file changed after the cache was built); restart the run to rebuild it"
                )
            return entry

        return features


@torch.no_grad()
def encode_scenes(model: LFLLMForCausalLM, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The frozen front end on a collated batch, split per scene: image tokens (T, D), depth tokens
    (T, D) when depth tokens are on, SAM embeddings (C, g, g), the depth stream's input (2, 4g, 4g) when
    it is on."""
    image_tokens, depth_tokens, visual = model.encode_frozen(batch)
    visual_key = "sam_embeddings" if model.sam is not None else "vision_features"
    depth = model.sam_depth(batch)
    out = []
    for i in range(visual.shape[0]):
        entry = {"image_tokens": image_tokens[i], visual_key: visual[i]}
        if depth_tokens is not None:
            entry["depth_tokens"] = depth_tokens[i]
        if depth is not None:
            entry["sam_depth"] = depth[i]
        out.append(entry)
    return out


@torch.no_grad()
def cached_batch(model: LFLLMForCausalLM, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` as the feature cache serves it: the image keys replaced by the frozen front end's outputs
    (what a cached data path collates), for benchmarks and tests."""
    entries = encode_scenes(model, batch)
    out = {k: v for k, v in batch.items() if k not in STACKED_IMAGE_KEYS}
    for key in entries[0]:
        out[key] = torch.stack([e[key] for e in entries])
    return out


def build_feature_cache(
    model: LFLLMForCausalLM,
    groups: Sequence[SceneDataset],
    spec: SampleSpec,
    tokens: TokenSpec,
    tokenizer: Any,
    store: FeatureStore,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    show_progress: bool = True,
) -> int:
    """Compute every missing, stale or corrupt entry of the scenes of ``groups``; rank ``r`` takes every
    ``world_size``-th of rank 0's list; every rank returns once all are written. Returns the number this
    rank wrote. ``groups`` must read pixels (``with_pixels=True``)."""
    todo: list[tuple[SceneDataset, int]] = []
    seen = set()
    for scenes in groups:
        for i, s in enumerate(scenes.scenes):
            name = (scenes.names[s.ds_index], s.image_id)
            if name in seen:
                continue
            seen.add(name)
            if store.read(*name, scene_signature(scenes, i, spec)) is None:
                todo.append((scenes, i))
    counts = distributed.gather_objects(len(todo))
    if rank == 0 and show_progress:
        total = sum(len(g.scenes) for g in groups)
        print(f"--feature_cache {store.folder}: {len(todo)} of {total} scene entries to compute", flush=True)
        for line in store.reported:
            print(f"note: {line}", flush=True)
    assert len(set(counts)) == 1, f"ranks disagree on the entries to compute: {counts}"
    mine = todo[rank::world_size]
    written, was_training = 0, model.training
    model.eval()
    try:
        for scenes in groups:
            indices = [i for g, i in mine if g is scenes]
            if not indices:
                continue
            data = ReferSegDataset(scenes, tokenizer, spec, tokens, train=False, with_answers=False)
            loader = DataLoader(
                Subset(data, indices),
                batch_size=batch_size,
                collate_fn=partial(collate_batch, pad_id=tokens.pad_id),
            )
            bar = tqdm(
                loader, desc="feature cache", unit="batch", disable=not show_progress, dynamic_ncols=True
            )
            position = 0
            for batch in bar:
                for entry in encode_scenes(model, move_batch(batch, torch.device(device))):
                    index = indices[position]
                    s = scenes.scenes[index]
                    store.write(
                        scenes.names[s.ds_index], s.image_id, scene_signature(scenes, index, spec), entry
                    )
                    position += 1
                    written += 1
    finally:
        model.train(was_training)
    distributed.barrier()
    return written


def open_store(cfg: RunConfig, model: LFLLMForCausalLM, spec: SampleSpec) -> FeatureStore:
    """The store of this run's configuration under ``--feature_cache`` (refused when not cacheable)."""
    check_cacheable(model.config)
    compute = next(model.model.vision_tower.parameters()).dtype
    storage = STORAGE_DTYPES[cfg.run.feature_cache_dtype] or compute
    key = cache_key(model, spec, cfg.data, cfg.datasets.disparity_set, storage)
    return FeatureStore(Path(cfg.run.feature_cache), key, compute, storage, spec)


def prepare_feature_cache(
    cfg: RunConfig,
    model: LFLLMForCausalLM,
    tokenizer: Any,
    dist_info: Any,
    *,
    train: bool,
    val: bool,
) -> FeatureStore | None:
    """``--feature_cache``: the store of this run, filled for the scenes of the training split (``train``)
    and of ``--val_dataset`` (``val``) before the loaders are built; None without the flag."""
    if not cfg.run.feature_cache:
        return None
    spec = SampleSpec.from_model_config(
        model.config,
        cfg.prompt.conv_type,
        pack=cfg.loop.pack_conversations,
        exprs_per_question=cfg.loop.exprs_per_question,
    )
    store = open_store(cfg, model, spec)
    views = caam_views(model.config)
    groups = []
    if train:
        groups.append(train_scenes(cfg, views, with_disparity=spec.needs_disparity))
    if val:
        groups.append(val_scenes(cfg, spec.needs_disparity, views))
    tokens = TokenSpec.from_tokenizer(tokenizer, model.config.image_seq_length, cfg.prompt.model_max_length)
    build_feature_cache(
        model, groups, spec, tokens, tokenizer, store, rank=dist_info.rank, world_size=dist_info.world_size,
        device=dist_info.device, batch_size=max(1, cfg.eval.val_batch_size), show_progress=dist_info.is_main,
    )  # fmt: skip
    return store
