"""No code runs from a file we read: the weights-only gate of every ``torch.save`` file (DeepSpeed included).

DeepSpeed reads its checkpoints (resume; ``zero_to_fp32`` in the merge) with ``torch.load(weights_only=
False)``, which runs whatever a pickle asks for. Before any such read, every ``*.pt`` file of the
checkpoint goes through :func:`verify_torch_file`: a full ``torch.load(weights_only=True)`` whose
unpickler refuses every global except tensors, containers and the three plain records DeepSpeed stores
(:data:`DEEPSPEED_RECORDS`: its loss scaler, ZeRO stage enum and fragment address). A file that passes
contains nothing else, so DeepSpeed's own read of the same bytes cannot run code either; a file that
fails is refused with its name and the global it asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A file would run code (or holds objects other than tensors and plain records) when loaded."""


def deepspeed_records() -> list[type]:
    """The plain classes DeepSpeed pickles into its ZeRO checkpoints (imported only when needed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_torch_file(path: str | Path, allowed: Iterable[type] = ()) -> Any:
    """Load ``path`` with the weights-only unpickler (plus the ``allowed`` classes) and return it.

    Raises:
        UnsafeCheckpointError naming the file and what it asked for, when the pickle references anything
        else (a payload that would run code is refused here, before anything of it executes).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise UnsafeCheckpointError(f"{path}: refused: not a plain PyTorch file ({exc})") from None
    except Exception as exc:
        raise UnsafeCheckpointError(_message(path, exc)) from None
    try:  # the legacy (non-zip) format cannot be memory-mapped
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(_message(path, exc)) from None


def _message(path: Path, exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if match:
        name = match.group(1)
        return (
            f"{path}: refused to load: it asks for {name}, which is neither a tensor nor a plain record "
            "(loading it could run code). Only weights-only files are read; re-save the weights with "
            "torch.save(state_dict) or safetensors from a trusted environment"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{path}: refused to load as a weights-only PyTorch file ({type(exc).__name__}: {first[:200]})"


def verify_deepspeed_checkpoint(tag_dir: str | Path) -> int:
    """Gate every ``*.pt`` file of a DeepSpeed checkpoint folder (``…/ckpt_model/<tag>``) through
    :func:`verify_torch_file` with :func:`deepspeed_records` allowed. Returns the number of files.

    Raises ``UnsafeCheckpointError`` on the first file that fails, ``FileNotFoundError`` when the folder
    holds no ``*.pt`` file."""
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed checkpoint files (*.pt) in this folder")
    allowed = deepspeed_records()
    for file in files:
        verify_torch_file(file, allowed)
    return len(files)
