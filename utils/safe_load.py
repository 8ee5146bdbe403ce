"""No code runs from a file we read: the weights-only gate of every ``torch.save`` file (DeepSpeed included).

DeepSpeed reads its checkpoints (resume; ``zero_to_fp32`` in the merge) with ``torch.load(weights_only=
False)``, which runs whatever a pickle asks for. Before any such read, every ``*.pt`` file of the
checkpoint goes through :func:`verify_torch_file`: a full ``torch.load(weights_only=True)`` whose
unpickler refuses every global except tensors, containers and the three plain records DeepSpeed stores
(:data:`DEEPSPEED_RECORDS`: its loss scaler, ZeRO stage enum and fragment address). A file that passes
contains nothing else, so DeepSpeed's own read of the same bytes cannot run code either; a file that
fails is refused with its name and the global it asked for, in our words (torch's advice to retry with
``weights_only=False`` is never shown).

What is loaded is exactly what was saved: :func:`mismatch_message` is the one wording of missing,
unexpected and mis-shaped weights and of token ids that disagree with the tokenizer, for a merged model, a
base LLaVA and a trained checkpoint alike (each clause names the file and the first key, and how many
more); :class:`WeightsMismatchError` carries it. :func:`weight_files` and :func:`read_weight_keys` find and
open a folder's weight files, refusing a truncated ``.safetensors`` with a sentence naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


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
            raise UnsafeCheckpointError(_message(path, exc)) from None
    except Exception as exc:
        raise UnsafeCheckpointError(_message(path, exc)) from None
    try:  # the legacy (non-zip) format cannot be memory-mapped
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(_message(path, exc)) from None


#: Lines of torch's weights-only error that are advice, not the reason (among them the advice to retry with
#: ``weights_only=False``, which would run the file's code: never shown to the user).
_TORCH_ADVICE = re.compile(
    r"weights_only|trusted source|file an issue|documentation of torch\.load|pytorch\.org"
)


def torch_load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words: the global a payload asks for, a
    truncated archive, or torch's reason without its advice (never "set weights_only=False")."""
    text = str(exc)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if match:
        return (
            f"refused to load: it asks for {match.group(1)}, which is neither a tensor nor a plain record "
            "(loading it could run code). Only weights-only files are read; re-save the weights with "
            "torch.save(state_dict) or safetensors from a trusted environment"
        )
    if isinstance(exc, EOFError) or re.search(
        r"central directory|PytorchStreamReader|truncated|Ran out of input", text
    ):
        return "the file is truncated or damaged (not a complete PyTorch archive); copy or save it again"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _TORCH_ADVICE.search(line)]
    reason = "; ".join(lines)[:200] or type(exc).__name__
    return f"not a PyTorch weights file ({reason})"


def _message(path: Path, exc: Exception) -> str:
    reason = torch_load_reason(exc)
    if reason.startswith("refused"):
        return f"{path}: {reason}"
    return f"{path}: refused to load as a weights-only PyTorch file: {reason}"


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


class WeightsMismatchError(KeyError, ValueError):
    """Weights (or token ids) that are not exactly what the model they would load into holds: missing,
    unexpected or mis-shaped tensors, ids that disagree with the tokenizer. The message is
    :func:`mismatch_message`'s; ``str()`` is that message (not ``KeyError``'s quoted form)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def first_of(names: Sequence[str]) -> str:
    """``'a'`` or ``'a' (and 3 more)``: the first offending name and how many others."""
    return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


Located = tuple[str | Path, str]  # (file, key)


def mismatch_message(
    missing: Sequence[Located] = (),
    unexpected: Sequence[Located] = (),
    mismatched: Sequence[tuple[str | Path, str, tuple, tuple]] = (),
    *,
    missing_what: str = "key",
    unexpected_note: str = "",
    expects: str = "the model expects",
    then: str = "",
) -> str:
    """The one wording of weights that do not match: ``<file>: missing key 'k' (and N more); <file>:
    unexpected key 'u'; <file>: key 'm' has shape (a), the model expects (b); <then>``. Each clause names the
    file of its first key (sorted by key) and counts the rest; empty sequences are left out.

    ``mismatched`` holds (file, key, saved shape, expected shape); ``then`` says what loading would do and
    the fix."""
    clauses = []
    if missing:
        items = sorted(missing, key=lambda x: x[1])
        clauses.append(f"{items[0][0]}: missing {missing_what} {first_of([k for _, k in items])}")
    if unexpected:
        items = sorted(unexpected, key=lambda x: x[1])
        clauses.append(f"{items[0][0]}: unexpected key {first_of([k for _, k in items])}{unexpected_note}")
    if mismatched:
        file, key, saved, expected = sorted(mismatched, key=lambda x: x[1])[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        clauses.append(f"{file}: key {key!r} has shape {tuple(saved)}, {expects} {tuple(expected)}{more}")
    return "; ".join(clauses + ([then] if then else []))


def token_mismatch_message(config_file: str | Path, tokenizer_dir: str | Path, wrong: Sequence[tuple]) -> str:
    """The token-id form of :func:`mismatch_message`: ``wrong`` holds (config key, its id, token, the
    tokenizer's id or None when the tokenizer lacks the token), the first named, the rest counted."""
    key, value, token, actual = wrong[0]
    has = f"has {token} at {actual}" if actual is not None else f"has no {token} token"
    more = f" (and {len(wrong) - 1} more: {', '.join(w[0] for w in wrong[1:])})" if len(wrong) > 1 else ""
    return (
        f"{config_file}: key {key!r} is {value}, but the tokenizer in {tokenizer_dir} {has}{more}; the model "
        "would read its token rows and [SEG] positions at the wrong ids, so it is refused: restore config.json "
        "or the tokenizer files to those the model was saved with"
    )


SAFETENSORS_INDEX, SAFETENSORS_FILE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_FILE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def weight_files(folder: str | Path) -> tuple[Path, list[Path]] | None:
    """(the file that names the weights: an index or the single file, the weight files) of an HF-style
    folder, in transformers' order of preference (safetensors first); None when it has none.

    Raises ``ValueError`` / ``FileNotFoundError`` naming an index that is not JSON or lists a missing file."""
    folder = Path(folder)
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"{folder / index}: not a weight index (expected JSON with a weight_map: {exc})"
                ) from None
            absent = [n for n in names if not (folder / n).is_file()]
            if absent:
                raise FileNotFoundError(f"{folder / index}: lists {first_of(absent)}, not in {folder}")
            return folder / index, [folder / n for n in names]
        if (folder / single).is_file():
            return folder / single, [folder / single]
    return None


def open_safetensors(path: str | Path):
    """``safe_open`` of ``path``; a truncated or damaged file is a ``ValueError`` naming it (a sentence, not
    the reader's traceback)."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        detail = str(exc).removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"{path}: not a complete safetensors file ({detail}): it is truncated or damaged; copy or save it again"
        ) from None


def read_weight_keys(files: Sequence[Path]) -> dict[str, Path]:
    """Every tensor name of ``files`` -> its file. A ``.safetensors`` file's header only is read (a truncated
    file is refused naming it); any other file passes :func:`verify_torch_file` first (a payload is refused
    before anything else reads it)."""
    keys: dict[str, Path] = {}
    for file in files:
        if file.suffix == ".safetensors":
            names = list(open_safetensors(file).keys())
        else:
            state = verify_torch_file(file)
            if not isinstance(state, dict):
                raise ValueError(f"{file}: not a state dict of tensors")
            names = list(state)
        keys.update(dict.fromkeys(names, file))
    return keys
