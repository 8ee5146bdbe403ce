"""Atomic DeepSpeed checkpoints, resume lookup, and the trainable-weights export for the merge script.

Layout under ``<run>/ckpt_model/``: ``<tag>/`` DeepSpeed checkpoints (``last``, ``best``), ``latest`` (the
tag to resume from). A checkpoint is written as ``.tmp-<tag>/``; when every rank has finished writing,
rank 0 adds ``complete.json`` (its global step) and renames it into place (the previous one is moved
to ``.old-<tag>/`` first and deleted after), then ``latest`` is replaced atomically. A run killed at any
point of a save leaves at least one complete checkpoint, and :func:`find_resume_checkpoint` picks the
newest complete one whatever its name (``last``, ``.tmp-last``, ``.old-last``, ``best``…) and says so.
Every file is read through the weights-only gate (``utils.safe_load``) before DeepSpeed loads it.
A save that fills the disk removes its partial files and raises ``utils.outputs.DiskFullError`` naming the
path, the disk and its free space; the previous checkpoint and export are left as they were.
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

from model.light_decoder import LIGHT_FILE, LightMaskDecoder, save_light_decoder
from utils.outputs import on_disk_full
from utils.safe_load import verify_deepspeed_checkpoint

TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE_META = "trainable.json"
COMPLETE_FILE = "complete.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (a full disk: the temporary
    file is removed, ``path`` kept, and ``DiskFullError`` raised)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with on_disk_full(path, partial=[tmp], kept=f"{path} is as it was" if path.exists() else ""):
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
    final = ckpt_dir / tag
    # a full disk: rank 0 removes the partial .tmp-<tag> (the other ranks' launcher stops them); the
    # previous checkpoint is untouched until the new one is complete
    partial = [ckpt_dir / tmp_tag] if _rank() == 0 else []
    kept = f"the previous checkpoint {final} is as it was" if final.exists() else ""
    with on_disk_full(final, partial=partial, kept=kept):
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tmp_tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
    _barrier()
    if _rank() == 0:
        step = int(client_state.get("global_step", getattr(engine, "global_steps", 0)))
        with on_disk_full(final, partial=partial, kept=kept):
            atomic_write_text(
                ckpt_dir / tmp_tag / COMPLETE_FILE, json.dumps({"global_step": step, "tag": tag})
            )
        old = ckpt_dir / f".old-{tag}"
        if final.exists():
            os.replace(final, old)
        os.replace(ckpt_dir / tmp_tag, final)
        try:  # the new checkpoint is complete in place: the old one goes even if 'latest' cannot be written
            if update_latest:
                atomic_write_text(ckpt_dir / "latest", tag)
        finally:
            if old.exists():
                shutil.rmtree(old)
    _barrier()
    return final


def checkpoint_step(folder: Path) -> int | None:
    """The global step of a complete checkpoint folder (its ``complete.json``), else None. A folder with
    a final name (``last``/``best``) but no marker, written before markers existed, counts as complete
    at step -1 (older than any marked one)."""
    marker = folder / COMPLETE_FILE
    if marker.is_file():
        try:
            return int(json.loads(marker.read_text())["global_step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    if not folder.name.startswith(".") and any(folder.glob("*model_states.pt")):
        return -1
    return None


def find_resume_checkpoint(ckpt_dir: str | Path) -> tuple[str, str | None] | None:
    """(tag folder to resume from, a note when it is not the one ``latest`` names) or None.

    The newest complete checkpoint among every folder of ``ckpt_dir`` (``last``, ``best``, and the
    ``.tmp-*`` / ``.old-*`` folders an interrupted save leaves); ties go to the folder ``latest`` names,
    then to final names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    found = []
    for folder in ckpt_dir.iterdir():
        step = checkpoint_step(folder) if folder.is_dir() else None
        if step is not None:
            found.append((step, folder.name == latest, not folder.name.startswith("."), folder.name))
    if not found:
        return None
    step, _, _, name = max(found)
    if name == latest:
        return name, None
    said = f"'latest' names {latest!r}, which is missing or incomplete" if latest else "no 'latest' file"
    return name, f"{said}; resuming from {ckpt_dir / name} (step {step}), the newest complete checkpoint"


def find_resume_tag(ckpt_dir: str | Path) -> str | None:
    """The tag folder :func:`find_resume_checkpoint` picks, or None."""
    found = find_resume_checkpoint(ckpt_dir)
    return None if found is None else found[0]


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load model, optimiser and scheduler state; returns the client state saved with it.

    Every file of the checkpoint passes the weights-only gate first (DeepSpeed itself unpickles with
    ``weights_only=False``); a file that would run code raises ``UnsafeCheckpointError`` naming it."""
    verify_deepspeed_checkpoint(Path(ckpt_dir) / tag)
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
    step is needed (the merge script also accepts DeepSpeed checkpoints and ``zero_to_fp32`` output). A model
    with the light mask head also gets its decoder alone as ``light_decoder.safetensors`` (``--light_pretrained``).
    """
    out_dir = Path(out_dir)
    path = out_dir / TRAINABLE_FILE
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{TRAINABLE_FILE}.tmp"
        kept = f"the previous export in {out_dir} is as it was" if path.exists() else ""
        # both files are written before either replaces its predecessor: a full disk leaves the previous
        # export whole and no partial file behind
        with on_disk_full(path, partial=[tmp], kept=kept):
            save_file(trainable_state(model), str(tmp))
            atomic_write_text(out_dir / TRAINABLE_META, json.dumps(meta, indent=2))
        os.replace(tmp, path)
        decoder = next((m for m in model.modules() if isinstance(m, LightMaskDecoder)), None)
        light_tmp = out_dir / f".{LIGHT_FILE}.tmp"  # save_light_decoder's temporary file
        with on_disk_full(out_dir / LIGHT_FILE, partial=[light_tmp]):
            if decoder is not None:  # the light head alone, to start another run from (--light_pretrained)
                save_light_decoder(decoder.state_dict(), decoder.cfg, out_dir / LIGHT_FILE, record=meta)
    _barrier()
    return path
