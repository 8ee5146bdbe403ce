"""Atomic DeepSpeed checkpoints, resume lookup, and the trainable-weights export for the merge script.

Layout under ``<run>/ckpt_model/``: ``<tag>/`` DeepSpeed checkpoints (``last``, ``best``), ``latest`` (the
tag to resume from). A checkpoint is written as ``.tmp-<tag>/`` and renamed into place only when every
rank has finished writing, then ``latest`` is replaced atomically: a run killed mid-save leaves the
previous checkpoint intact and never one that loads half.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE_META = "trainable.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    engine: Any, ckpt_dir: str | Path, tag: str, client_state: dict[str, Any], update_latest: bool = True
) -> Path:
    """Save a DeepSpeed checkpoint as ``ckpt_dir/tag`` atomically; point ``latest`` at it when asked.

    Only trainable parameters (and the optimiser state) are stored: the frozen base (13.5 GB for 7B) is
    rebuilt from ``--version`` on resume, so a checkpoint costs megabytes, not the model size."""
    ckpt_dir = Path(ckpt_dir)
    tmp_tag = f".tmp-{tag}"
    if _rank() == 0 and (ckpt_dir / tmp_tag).exists():
        shutil.rmtree(ckpt_dir / tmp_tag)
    _barrier()
    engine.save_checkpoint(
        str(ckpt_dir),
        tag=tmp_tag,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    _barrier()
    final = ckpt_dir / tag
    if _rank() == 0:
        old = ckpt_dir / f".old-{tag}"
        if final.exists():
            os.replace(final, old)
        os.replace(ckpt_dir / tmp_tag, final)
        if update_latest:
            atomic_write_text(ckpt_dir / "latest", tag)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return final


def find_resume_tag(ckpt_dir: str | Path) -> str | None:
    """The tag named by ``ckpt_dir/latest`` when that checkpoint exists, else None."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load model, optimiser and scheduler state; returns the client state saved with it."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"{Path(ckpt_dir) / tag}: no loadable DeepSpeed checkpoint")
    return client or {}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter (peft names), detached, contiguous, on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def export_trainable(model: torch.nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the trainable weights as one safetensors file (+ a JSON of how to rebuild the wrapper).

    ZeRO-1/2 keep full parameters on every rank, so rank 0 writes them directly; no ``zero_to_fp32``
    step is needed (the merge script also accepts DeepSpeed checkpoints and ``zero_to_fp32`` output).
    """
    out_dir = Path(out_dir)
    path = out_dir / TRAINABLE_FILE
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{TRAINABLE_FILE}.tmp"
        save_file(trainable_state(model), str(tmp))
        os.replace(tmp, path)
        atomic_write_text(out_dir / TRAINABLE_META, json.dumps(meta, indent=2))
    _barrier()
    return path
