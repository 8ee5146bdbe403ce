"""Nothing a user has is overwritten, and a full disk is a sentence (issue 36, criteria 1 and 5).

The merge (``--save_path``) and the converter (``--dst``) refuse an output that is, lies inside or holds
what they read, and a non-empty one without ``--overwrite``, before anything is built; they write beside
the output and move it into place when complete. A save that fills the disk (merge, converter, training
checkpoint, export) removes its partial files, keeps the previous content and names the path, the disk and
its free space.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
import runpy
import shutil
import socket
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

import merge_lora_weights_and_save_hf_model as merge_script
from tests.test_convert import original_config, original_state
from tests.test_merge import make_trained_export
from training import checkpoint as ckpt_lib
from training.checkpoint import TRAINABLE_FILE, TRAINABLE_META, export_trainable, save_checkpoint
from utils import outputs
from utils.outputs import DiskFullError, OutputDirError, is_disk_full, mount_point

merge_lib = importlib.import_module("training.serve.merge")
convert_lib = importlib.import_module("training.serve.convert_llava")
ROOT = Path(__file__).resolve().parents[1]
FREE = re.compile(r"which has \d+(\.\d)? (B|KiB|MiB|GiB|TiB) free of \d+(\.\d)? (B|KiB|MiB|GiB|TiB)")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
Usage = namedtuple("Usage", "total used free")  # what shutil.disk_usage returns


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its bytes' digest) and folder under ``root``: equal snapshots mean nothing changed."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary or moved-aside folders/files a write left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if re.match(r"\..*\.(tmp|old)(-|$)", p.name))


def disk_full_said(message: str, path: Path) -> None:
    """The full-disk sentence names the path, the disk (mount point) and the free space."""
    assert str(path) in message, message
    assert f"mounted at {mount_point(path)}," in message, message
    assert FREE.search(message), message


@pytest.fixture(scope="module")
def base(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the tiny base (the LLaVA folder and the SAM checkpoint in its own folder): a refusal
    that failed must not damage the session's base."""
    root = tmp_path_factory.mktemp("own_base")
    shutil.copytree(tiny_base["llava"], root / "llava")
    (root / "sam").mkdir()
    shutil.copy(tiny_base["sam"], root / "sam" / "sam_tiny.pth")
    return {"root": root, "llava": root / "llava", "sam": root / "sam" / "sam_tiny.pth"}


@pytest.fixture(scope="module")
def export(base, tmp_path_factory) -> Path:
    """A trained export of that base, ``<run>/export`` (its trainable.json names the base)."""
    return make_trained_export(base, tmp_path_factory.mktemp("run") / "export", seed=3)[2]


def merge(export: Path, save_path: Path, *extra: str | Path) -> Path:
    args = ["--weight", export, "--save_path", save_path, "--precision", "fp32", *extra]
    return merge_script.main([str(a) for a in args])


@pytest.fixture()
def nothing_built(monkeypatch):
    """Fail the test if the merge reads the weights or builds the model (a refusal comes before both)."""

    def built(*args, **kwargs):
        raise AssertionError("the weights were read or the model built before the refusal")

    monkeypatch.setattr(merge_lib, "open_weights", built)
    monkeypatch.setattr(merge_lib, "build_lfllm", built)


def fail_processor_save(monkeypatch, error: BaseException) -> None:
    """The last write of a merge / conversion (the image processor, after the weights) writes a part of
    its file, then fails with ``error``."""

    def save_pretrained(self, folder, *args, **kwargs):
        (Path(folder) / "preprocessor_config.json").write_text('{"half": ')
        raise error

    monkeypatch.setattr(CLIPImageProcessor, "save_pretrained", save_pretrained)


# --- the merge: --save_path against what it reads ---

CASES = {
    # id: (--save_path, the input it collides with, --weight given as the export's file)
    "is --version": (lambda b, e: b["llava"], lambda b, e: ("--version", b["llava"]), False),
    "inside --version": (lambda b, e: b["llava"] / "merged", lambda b, e: ("--version", b["llava"]), False),
    "holds --version": (lambda b, e: b["root"], lambda b, e: ("--version", b["llava"]), False),
    "is the SAM's folder": (
        lambda b, e: b["sam"].parent,
        lambda b, e: ("--vision_pretrained", b["sam"]),
        False,
    ),
    "is the SAM file": (lambda b, e: b["sam"], lambda b, e: ("--vision_pretrained", b["sam"]), False),
    "is --weight": (lambda b, e: e, lambda b, e: ("--weight", e), False),
    "inside --weight": (lambda b, e: e / "merged", lambda b, e: ("--weight", e), False),
    "holds --weight": (lambda b, e: e.parent, lambda b, e: ("--weight", e), False),
    "is a --weight file": (
        lambda b, e: e / TRAINABLE_FILE,
        lambda b, e: ("--weight", e / TRAINABLE_FILE),
        True,
    ),
    "holds a --weight file": (lambda b, e: e, lambda b, e: ("--weight", e / TRAINABLE_FILE), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_path_that_is_inside_or_holds_an_input_is_refused(case, base, export, nothing_built):
    out_of, input_of, weight_file = CASES[case]
    out, (flag, given) = out_of(base, export), input_of(base, export)
    before = snapshot(base["root"]), snapshot(export.parent)
    weight = export / TRAINABLE_FILE if weight_file else export
    with pytest.raises(OutputDirError) as err:
        merge(weight, out)
    message = str(err.value)
    assert f"--save_path {out} " in message and f"{flag} {given}:" in message, message
    assert "choose another --save_path" in message
    assert (snapshot(base["root"]), snapshot(export.parent)) == before  # byte-identical, nothing added
    assert not leftovers(out.parent)


def test_the_merge_script_ends_a_refusal_with_one_line(base, export, nothing_built, monkeypatch):
    argv = ["merge", "--weight", str(export), "--save_path", str(base["llava"]), "--overwrite"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as err:
        runpy.run_path(str(ROOT / "merge_lora_weights_and_save_hf_model.py"), run_name="__main__")
    assert str(err.value.code).startswith(f"error: --save_path {base['llava']} is --version {base['llava']}:")


def test_non_empty_save_path_needs_overwrite_and_is_replaced_only_when_complete(
    base, export, tmp_path, monkeypatch
):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text('{"mine": true}')
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(merge_lib, "build_lfllm", lambda *a, **k: pytest.fail("built before the refusal"))
        with pytest.raises(OutputDirError, match=r"--save_path .*merged is not empty \(config\.json, notes"):
            merge(export, out)
    assert snapshot(out) == before
    # --overwrite, but the disk fills up during the last write: the previous content stays
    with monkeypatch.context() as m:
        fail_processor_save(m, ENOSPC)
        with pytest.raises(DiskFullError) as err:
            merge(export, out, "--overwrite")
    assert isinstance(err.value, ValueError) and err.value.errno == errno.ENOSPC  # the scripts' one-line path
    disk_full_said(str(err.value), out)
    assert f"{out} is as it was" in str(err.value)
    assert snapshot(out) == before and not leftovers(tmp_path)
    # any other crash half-way: the same, with the error itself
    with monkeypatch.context() as m:
        fail_processor_save(m, RuntimeError("killed half-way"))
        with pytest.raises(RuntimeError, match="killed half-way"):
            merge(export, out, "--overwrite")
    assert snapshot(out) == before and not leftovers(tmp_path)
    # --overwrite acts: the complete merged model replaces the old content
    assert merge(export, out, "--overwrite") == out
    files = {p.name for p in out.iterdir()}
    assert "notes.txt" not in files and {"config.json", "merge_info.json", "tokenizer.json"} <= files
    assert json.loads((out / "config.json").read_text())["model_type"] == "lfllm"
    assert not leftovers(tmp_path)


def test_full_disk_into_a_new_save_path_leaves_nothing(export, tmp_path, monkeypatch):
    out = tmp_path / "deep" / "merged"
    fail_processor_save(monkeypatch, OSError(errno.EDQUOT, "Disk quota exceeded"))
    with pytest.raises(DiskFullError, match="your disk quota is exhausted") as err:
        merge(export, out)
    disk_full_said(str(err.value), out)
    assert not out.exists() and not leftovers(out.parent)


def test_save_path_beside_the_sam_checkpoint_is_accepted(base, export, tmp_path):
    """The README's layout: ``--vision_pretrained sam.pth --save_path ./merged`` in one folder."""
    models = tmp_path / "models"
    models.mkdir()
    sam = shutil.copy(base["sam"], models / "sam.pth")
    digest = hashlib.sha256(Path(sam).read_bytes()).hexdigest()
    (models / "merged").mkdir()  # an existing empty folder needs no --overwrite
    out = merge(export, models / "merged", "--vision_pretrained", sam)
    assert (out / "config.json").is_file() and not leftovers(models)
    assert hashlib.sha256(Path(sam).read_bytes()).hexdigest() == digest


# --- the converter: --dst against --src and the CLIP folder ---


@pytest.fixture(scope="module")
def original(base, tmp_path_factory) -> dict[str, Path]:
    """An original-format LLaVA folder (``--src``) and a CLIP folder, from the tiny base."""
    llava = LlavaForConditionalGeneration.from_pretrained(base["llava"]).eval()
    root = tmp_path_factory.mktemp("original")
    clip = root / "clip"
    llava.model.vision_tower.save_pretrained(clip)
    shutil.copy(base["llava"] / "preprocessor_config.json", clip)
    src = root / "llava-v1.5-tiny"
    src.mkdir()
    save_file(original_state(llava, with_vision=False), str(src / "model.safetensors"))
    vocab = llava.config.text_config.vocab_size
    (src / "config.json").write_text(json.dumps(original_config(llava, vocab, str(clip))))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base["llava"] / file, src)
    return {"root": root, "src": src, "clip": clip}


@pytest.mark.parametrize(
    "dst, flag, given",
    [
        ("src", "--src", "src"),
        ("src/hf", "--src", "src"),
        ("root", "--src", "src"),
        ("clip", "--vision_tower", "clip"),
        ("clip/hf", "--vision_tower", "clip"),
    ],
)
def test_dst_that_is_inside_or_holds_an_input_is_refused(original, dst, flag, given, monkeypatch):
    monkeypatch.setattr(convert_lib, "open_weights", lambda *a: pytest.fail("read before the refusal"))
    dst, given = original[dst.split("/")[0]] / "/".join(dst.split("/")[1:]), original[given]
    before = snapshot(original["root"])
    argv = ["--src", str(original["src"]), "--dst", str(dst), "--vision_tower", str(original["clip"])]
    with pytest.raises(OutputDirError) as err:
        convert_lib.main([*argv, "--overwrite"])
    assert f"--dst {dst} " in str(err.value) and f"{flag} {given}:" in str(err.value), str(err.value)
    assert snapshot(original["root"]) == before


def test_dst_inside_the_clip_folder_named_by_the_config_is_refused(original, monkeypatch):
    monkeypatch.setattr(convert_lib, "open_weights", lambda *a: pytest.fail("read before the refusal"))
    before = snapshot(original["root"])
    dst = original["clip"] / "hf"
    with pytest.raises(OutputDirError, match=rf"--dst {re.escape(str(dst))} is inside the CLIP folder \(mm_"):
        convert_lib.main(["--src", str(original["src"]), "--dst", str(dst)])
    assert snapshot(original["root"]) == before


def test_converter_needs_overwrite_and_keeps_the_old_dst_on_a_full_disk(original, tmp_path, monkeypatch):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "config.json").write_text('{"mine": true}')
    before = snapshot(dst)
    argv = ["--src", str(original["src"]), "--dst", str(dst)]
    with pytest.raises(OutputDirError, match=r"--dst .*hf is not empty \(config\.json\); pass --overwrite"):
        convert_lib.main(argv)
    with monkeypatch.context() as m:
        fail_processor_save(m, ENOSPC)
        with pytest.raises(DiskFullError) as err:
            convert_lib.main([*argv, "--overwrite"])
    disk_full_said(str(err.value), dst)
    assert snapshot(dst) == before and not leftovers(tmp_path)
    monkeypatch.setattr(sys, "argv", ["convert", *argv, "--overwrite"])  # the script: one line, no traceback
    with monkeypatch.context() as m:
        fail_processor_save(m, ENOSPC)
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(dst))}: cannot save: no space left"):
            runpy.run_path(str(ROOT / "scripts" / "convert_llava_to_hf.py"), run_name="__main__")
    assert snapshot(dst) == before and not leftovers(tmp_path)
    assert convert_lib.main([*argv, "--overwrite"]) == dst
    assert LlavaForConditionalGeneration.from_pretrained(dst).config.model_type == "llava"
    assert not leftovers(tmp_path)


# --- training checkpoints and exports ---


class _Saver:
    """Writes one file of a DeepSpeed checkpoint, then fails with ``error`` (None: completes)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(str(client_state))
        if self.error is not None:
            raise self.error
        (folder / "optim_states.pt").write_text("done")


TORCH_WRITER = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS = type("SafetensorError", (Exception,), {})(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


@pytest.mark.parametrize("error", [ENOSPC, TORCH_WRITER], ids=["ENOSPC", "torch-zip-writer"])
def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(error, tmp_path, monkeypatch):
    save_checkpoint(_Saver(), tmp_path, "last", {"global_step": 1})
    before = snapshot(tmp_path)
    if error is TORCH_WRITER:  # torch.save says "unexpected pos": a full disk only when it is nearly full
        monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 4096))
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(_Saver(error), tmp_path, "last", {"global_step": 2})
    disk_full_said(str(err.value), tmp_path / "last")
    assert f"the previous checkpoint {tmp_path / 'last'} is as it was" in str(err.value)
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)  # .tmp-last removed
    assert (tmp_path / "latest").read_text() == "last"


def test_a_torch_writer_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    save_checkpoint(_Saver(), tmp_path, "last", {"global_step": 1})
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: Usage(10**12, 1, 10**11))
    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        save_checkpoint(_Saver(TORCH_WRITER), tmp_path, "last", {"global_step": 2})
    assert not isinstance(err.value, DiskFullError)
    assert (tmp_path / "last" / "optim_states.pt").is_file()


@pytest.mark.parametrize("error", [ENOSPC, SAFETENSORS], ids=["ENOSPC", "safetensors"])
def test_export_on_a_full_disk_keeps_the_previous_export(error, tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    out = tmp_path / "export" / "last"
    export_trainable(model, out, {"global_step": 1})
    before = snapshot(out)

    def full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 16)  # the part written before the disk filled up
        raise error

    monkeypatch.setattr(ckpt_lib, "save_file", full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(DiskFullError) as err:
        export_trainable(model, out, {"global_step": 2})
    disk_full_said(str(err.value), out / TRAINABLE_FILE)
    assert f"the previous export in {out} is as it was" in str(err.value)
    assert snapshot(out) == before and not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / TRAINABLE_META).read_text())["global_step"] == 1


def test_export_record_write_on_a_full_disk_removes_the_new_weights_too(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    out = tmp_path / "export"
    export_trainable(model, out, {"global_step": 1})
    before = snapshot(out)
    real_write = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name == f".{TRAINABLE_META}.tmp":
            real_write(self, text[:5])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError, match=rf"{TRAINABLE_META}: cannot save"):
        export_trainable(model, out, {"global_step": 2})
    monkeypatch.undo()
    assert snapshot(out) == before and not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- the helpers ---


@pytest.mark.parametrize(
    "error, free, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 10**12, True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**12, True),
        (SAFETENSORS, 10**12, True),
        (TORCH_WRITER, 4096, True),
        (TORCH_WRITER, 10**11, False),
        (OSError(errno.EACCES, "Permission denied"), 0, False),
        (RuntimeError("CUDA out of memory"), 0, False),
    ],
)
def test_what_counts_as_a_full_disk(error, free, full, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: Usage(10**12, 1, free))
    assert is_disk_full(error, tmp_path) is full
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = error
    assert is_disk_full(wrapped, tmp_path) is full


def test_an_interrupted_replacement_is_undone_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "merged"
    host, dead = socket.gethostname(), 2**31 - 1  # a pid no process has
    old = tmp_path / f".merged.old-{host}-{dead}"
    old.mkdir()
    (old / "config.json").write_text("previous")
    tmp = tmp_path / f".merged.tmp-{host}-{dead}"
    tmp.mkdir()
    (tmp / "config.json").write_text("new, maybe incomplete")
    foreign = tmp_path / f".merged.tmp-another-host-{os.getpid()}"
    foreign.mkdir()  # another machine's write on a shared disk: not ours to remove
    with pytest.raises(OutputDirError, match="is not empty"):
        outputs.check_output_dir(out, {}, overwrite=False, flag="--save_path")
    assert (out / "config.json").read_text() == "previous" and not tmp.exists() and foreign.exists()
    said = capsys.readouterr().out
    assert f"moving {old} back to {out}" in said and f"removing {tmp}" in said


def test_a_file_as_output_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(OutputDirError, match=r"--dst .*model is a file, not a folder"):
        outputs.check_output_dir(tmp_path / "model", {}, overwrite=True, flag="--dst")
    assert (tmp_path / "model").read_text() == "a file"


def test_a_run_folder_among_the_inputs_is_refused_before_anything_is_written(tiny_base, tiny_dataset, capsys):
    """``train_ds.py``: the run folder (``--log_base_dir``/``--exp_name``) may not be, lie inside or hold what
    the run reads; refused with status 2 and nothing created."""
    import train_ds

    llava = tiny_base["llava"]
    common = ["--dataset_dir", str(tiny_dataset), "--vision_pretrained", str(tiny_base["sam"])]
    for log_base, exp, flag in (
        (llava, "run", "--version"),  # inside the base
        (tiny_dataset, "runs", "--dataset_dir"),  # inside the dataset
        (tiny_dataset.parent, tiny_dataset.name, "--dataset_dir"),  # the dataset itself
    ):
        before = sorted(p.name for p in Path(log_base).iterdir())
        rc = train_ds.main(
            ["--version", str(llava), *common, "--log_base_dir", str(log_base), "--exp_name", exp]
        )
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"error: --log_base_dir/--exp_name {Path(log_base) / exp}" in err and flag in err, err
        assert sorted(p.name for p in Path(log_base).iterdir()) == before, "nothing written"
