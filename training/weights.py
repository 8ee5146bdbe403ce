"""Reading trained weights safely: our export, DeepSpeed ZeRO checkpoints, ``zero_to_fp32`` state dicts.

``open_weights`` identifies a ``--weight`` / checkpoint path and indexes its tensors without reading them;
``load_trainable`` checks them against a model wrapped for training (every trainable parameter present,
nothing unexpected, shapes equal, values finite) and copies them in. Used by the merge script and the
converter. Every refusal names the file and the first offending key in the one wording of
``utils.safe_load.mismatch_message``; a truncated ``.safetensors`` and a pickle payload are sentences too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.checkpoint import TRAINABLE_FILE, TRAINABLE_META
from utils.safe_load import (
    WeightsMismatchError,
    mismatch_message,
    open_safetensors,
    torch_load_reason,
    verify_deepspeed_checkpoint,
    weight_files,
)

DS_MODEL_STATES = "*_model_states.pt"


@dataclass
class WeightSource:
    """Trained tensors by name, read lazily.

    ``kind`` is ``"export"`` (our trainable export), ``"deepspeed"`` (trainable parameters + buffers of a
    DeepSpeed checkpoint) or ``"state_dict"`` (a full or partial state dict). For the first two the
    parameter names must equal the rebuilt model's trainable set; a state dict may also hold frozen names.
    """

    path: Path
    kind: str
    getters: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every tensor name."""
        return list(self.getters)

    def where(self, name: str) -> Path:
        """The file holding ``name`` (for error messages)."""
        return self.files.get(name, self.path)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (materialised from its file or mapped region only now)."""
        return self.getters[name]()

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``, from the file's header where it has one (no tensor is read)."""
        return self.shapes[name] if name in self.shapes else tuple(self.tensor(name).shape)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, memory-mapped when the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # e.g. the legacy (non-zip) format, which cannot be memory-mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's advice to retry with weights_only=False is never shown
            raise ValueError(
                f"{path}: cannot read as a PyTorch state dict: {torch_load_reason(exc)}"
            ) from None
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = "; pass the DeepSpeed checkpoint folder instead" if path.match(DS_MODEL_STATES) else ""
        raise ValueError(f"{path}: not a state dict of tensors{hint}")
    return state


def _add_file(source: WeightSource, path: Path) -> None:
    if path.suffix == ".safetensors":
        handle = open_safetensors(path)  # a truncated file: a sentence naming it
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            source.getters[name] = lambda n=name, h=handle: h.get_tensor(n)
            source.files[name] = path
            source.shapes[name] = tuple(handle.get_slice(name).get_shape())
    else:
        for name, tensor in _torch_state_dict(path).items():
            source.getters[name] = lambda t=tensor: t
            source.files[name] = path
            source.shapes[name] = tuple(tensor.shape)


def _sharded_files(folder: Path) -> list[Path] | None:
    """Files of a (sharded) HF-style state dict in ``folder`` (from its index), or None."""
    found = weight_files(folder)
    return None if found is None else found[1]


def _deepspeed_dirs(path: Path, tag: str | None) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) when ``path`` is a DeepSpeed checkpoint folder or one of its tag folders."""
    if any(path.glob(DS_MODEL_STATES)):
        return path.parent, path.name
    if tag is not None:
        if not any((path / tag).glob(DS_MODEL_STATES)):
            raise FileNotFoundError(
                f"{path / tag}: --tag {tag!r} names no DeepSpeed checkpoint ({DS_MODEL_STATES})"
            )
        return path, tag
    latest = path / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not any((path / name).glob(DS_MODEL_STATES)):
            raise FileNotFoundError(
                f"{latest}: names tag {name!r} but {path / name} holds no {DS_MODEL_STATES}"
            )
        return path, name
    return None


def _read_deepspeed(ckpt_dir: Path, tag: str) -> WeightSource:
    """Trainable parameters (float32 masters) and buffers of a ZeRO checkpoint, via ``zero_to_fp32``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 unpickles with weights_only=False: every file passes the weights-only gate first.
    verify_deepspeed_checkpoint(ckpt_dir / tag)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, exclude_frozen_parameters=True, lazy_mode=True
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{ckpt_dir / tag}: not a readable DeepSpeed ZeRO checkpoint ({exc})") from exc
    source = WeightSource(ckpt_dir / tag, "deepspeed")
    for name, lazy in state.items():
        source.getters[name] = lambda t=lazy: t.contiguous()
        source.shapes[name] = tuple(lazy.shape)
    return source


def open_weights(path: str | Path, tag: str | None = None) -> WeightSource:
    """Identify ``--weight`` (see the module docstring) and index its tensors without reading them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: --weight not found")
    if path.is_dir():
        if (path / TRAINABLE_FILE).is_file():
            return open_weights(path / TRAINABLE_FILE)
        deepspeed = _deepspeed_dirs(path, tag)
        if deepspeed is not None:
            return _read_deepspeed(*deepspeed)
        files = _sharded_files(path)
        if files is None:
            raise FileNotFoundError(
                f"{path}: no {TRAINABLE_FILE}, no DeepSpeed checkpoint ('latest' or {DS_MODEL_STATES}) and no "
                "zero_to_fp32 output (pytorch_model*.bin / model*.safetensors) in this folder"
            )
        source = WeightSource(path, "state_dict")
        for file in files:
            _add_file(source, file)
        return source
    kind = "export" if path.name == TRAINABLE_FILE else "state_dict"
    source = WeightSource(path, kind)
    _add_file(source, path)
    return source


def meta_path(weight: str | Path, tag: str | None = None) -> Path | None:
    """``trainable.json`` of the weights: in their folder, beside the file, one level up, or for a DeepSpeed
    checkpoint ``<run>/ckpt_model/<tag>`` the training run's export ``<run>/export/<tag>/``. None if absent."""
    path = Path(weight)
    folder = path if path.is_dir() else path.parent
    candidates = [folder / TRAINABLE_META, folder.parent / TRAINABLE_META]
    if path.is_dir():
        try:
            deepspeed = _deepspeed_dirs(path, tag)
        except FileNotFoundError:
            deepspeed = None
        if deepspeed is not None:
            ckpt_dir, ds_tag = deepspeed
            candidates.append(ckpt_dir.parent / "export" / ds_tag / TRAINABLE_META)
    return next((c for c in candidates if c.is_file()), None)


def read_meta(weight: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """The training metadata (see :func:`meta_path`) as a dict, or None when there is none."""
    path = meta_path(weight, tag)
    if path is None:
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    print(f"training options from {path}")
    return meta


def select_trainable(source: WeightSource, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Check ``source`` against the wrapped ``model`` and yield (name, tensor) for every trainable parameter.

    Every trainable parameter must be in ``source`` with its shape. Other names in ``source`` must be
    frozen parameters or buffers of the base (a full state dict; their values are not used), except for
    an export or a DeepSpeed checkpoint, which must hold exactly the trainable parameters (+ buffers).
    Every problem is found before any tensor is read (shapes come from the files' headers) and raised as one
    :class:`utils.safe_load.WeightsMismatchError` (a ``KeyError`` and a ``ValueError``) naming the weight
    file and the first offending key of each kind, and how many more.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    known = set(model.state_dict()) | set(params) | buffers
    keys = set(source.names())
    hint = "were the weights trained with other options? check --lora_r / --lora_target_modules / --train_mask_decoder"
    missing = [(source.path, k) for k in sorted(trainable - keys)]
    allowed = trainable | buffers if source.kind in ("export", "deepspeed") else known
    unexpected = [(source.where(k), k) for k in sorted(keys - allowed)]
    mismatched = [
        (source.where(k), k, source.shape(k), tuple(params[k].shape))
        for k in sorted(trainable & keys)
        if source.shape(k) != tuple(params[k].shape)
    ]
    if missing or unexpected or mismatched:
        frozen = (
            " (a frozen parameter of the rebuilt model)" if unexpected and unexpected[0][1] in known else ""
        )
        raise WeightsMismatchError(
            mismatch_message(
                missing,
                unexpected,
                mismatched,
                missing_what="trainable key",
                unexpected_note=frozen,
                expects="the rebuilt model expects",
                then=hint,
            )
        )
    for name in sorted(trainable):
        yield name, source.tensor(name)


@torch.no_grad()
def load_trainable(model: nn.Module, source: WeightSource) -> int:
    """Copy every trainable tensor of ``source`` into ``model`` (cast to each parameter's dtype); each must
    be finite. Returns the number of tensors loaded."""
    params = dict(model.named_parameters())
    count = 0
    for name, tensor in select_trainable(source, model):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source.where(name)}: key {name!r} holds NaN or infinite values")
        params[name].copy_(tensor)
        count += 1
    return count
