"""Merge trained LFLLM weights into the base model and save a standalone Hugging Face directory.

The trained weights (``--weight``) may be

* our export: ``trainable.safetensors`` (or the folder holding it), written by ``utils.checkpoint.export_trainable``;
* a DeepSpeed checkpoint folder: ``…/ckpt_model`` (tag from ``--tag`` or its ``latest`` file) or
  ``…/ckpt_model/<tag>``; read with DeepSpeed's ``zero_to_fp32`` functions (trainable parameters only);
* a full state dict as written by ``zero_to_fp32``: ``pytorch_model.bin`` (DeepSpeed < 0.15.3), or the
  output folder of newer versions (``pytorch_model*.bin`` / ``model*.safetensors``, sharded with an index).

The base (``--version`` LLaVA dir + ``--vision_pretrained`` SAM checkpoint) is rebuilt with the training
options (read from ``trainable.json`` next to the weights when present; flags override), wrapped exactly
as in training (``model.trainable.make_trainable``), the trained tensors are loaded strictly by name and
shape, and peft merges LoRA and the new token rows into plain weights. The result
(``--save_path``: sharded safetensors, config with every LFLLM field, tokenizer, image processor) loads
with ``LFLLMForCausalLM.from_pretrained(save_path)`` alone and with ``model.build.build_lfllm``.

Memory: the base is built directly in ``--precision``; only trained tensors are read into memory (full
state dicts are memory-mapped), so the peak is about one copy of the model.

Example::

    python merge_lora_weights_and_save_hf_model.py --version llava-1.5-7b-hf \\
        --vision_pretrained sam_vit_h_4b8939.pth --weight runs/lfllm/ckpt_model --save_path lfllm-7b-merged
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPImageProcessor

from model.build import DTYPES, ModelOptions, build_lfllm
from model.lfllm import LFLLMForCausalLM
from model.trainable import TrainableOptions, make_trainable, unwrap
from utils.checkpoint import TRAINABLE_FILE, TRAINABLE_META

MERGE_INFO = "merge_info.json"
DS_MODEL_STATES = "*_model_states.pt"


# --------------------------------------------------------------------------------------- reading weights
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

    def names(self) -> list[str]:
        """Every tensor name."""
        return list(self.getters)

    def where(self, name: str) -> Path:
        """The file holding ``name`` (for error messages)."""
        return self.files.get(name, self.path)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (materialised from its file or mapped region only now)."""
        return self.getters[name]()


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, memory-mapped when the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # e.g. the legacy (non-zip) format, which cannot be memory-mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read as a PyTorch state dict ({exc})") from exc
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = "; pass the DeepSpeed checkpoint folder instead" if path.match(DS_MODEL_STATES) else ""
        raise ValueError(f"{path}: not a state dict of tensors{hint}")
    return state


def _add_file(source: WeightSource, path: Path) -> None:
    if path.suffix == ".safetensors":
        handle = safe_open(str(path), framework="pt")
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            source.getters[name] = lambda n=name, h=handle: h.get_tensor(n)
            source.files[name] = path
    else:
        for name, tensor in _torch_state_dict(path).items():
            source.getters[name] = lambda t=tensor: t
            source.files[name] = path


def _sharded_files(folder: Path) -> list[Path] | None:
    """Files of a sharded HF-style state dict in ``folder`` (from its index), or None."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    return None


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

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, exclude_frozen_parameters=True, lazy_mode=True
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{ckpt_dir / tag}: not a readable DeepSpeed ZeRO checkpoint ({exc})") from exc
    source = WeightSource(ckpt_dir / tag, "deepspeed")
    for name, lazy in state.items():
        source.getters[name] = lambda t=lazy: t.contiguous()
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


# --------------------------------------------------------------------------------------- loading
def _more(names: list[str]) -> str:
    return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def select_trainable(source: WeightSource, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Check ``source`` against the wrapped ``model`` and yield (name, tensor) for every trainable parameter.

    Every trainable parameter must be in ``source`` with its shape. Other names in ``source`` must be
    frozen parameters or buffers of the base (a full state dict; their values are not used), except for
    an export or a DeepSpeed checkpoint, which must hold exactly the trainable parameters (+ buffers).
    Raises ``KeyError``/``ValueError`` naming the weight file and the first offending key.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    known = set(model.state_dict()) | set(params) | buffers
    keys = set(source.names())
    hint = "were the weights trained with other options? check --lora_r / --lora_target_modules / --train_mask_decoder"
    missing = sorted(trainable - keys)
    if missing:
        raise KeyError(f"{source.path}: missing trainable key {_more(missing)}; {hint}")
    allowed = trainable | buffers if source.kind in ("export", "deepspeed") else known
    unexpected = sorted(keys - allowed)
    if unexpected:
        frozen = " (a frozen parameter of the rebuilt model)" if unexpected[0] in known else ""
        raise KeyError(f"{source.where(unexpected[0])}: unexpected key {_more(unexpected)}{frozen}; {hint}")
    for name in sorted(trainable):
        tensor = source.tensor(name)
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{source.where(name)}: key {name!r} has shape {tuple(tensor.shape)}, the rebuilt model expects "
                f"{tuple(params[name].shape)}; {hint}"
            )
        yield name, tensor


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


def merge(model: nn.Module) -> LFLLMForCausalLM:
    """Fold LoRA and the trained token rows into plain weights; returns the bare ``LFLLMForCausalLM``."""
    if hasattr(model, "merge_and_unload"):
        # safe_merge would keep extra weight copies; the loaded tensors were checked finite instead
        model = model.merge_and_unload(progressbar=False, safe_merge=False)
    merged = unwrap(model)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


# --------------------------------------------------------------------------------------- options
def _switch(parser: argparse._ActionsContainer, name: str, help: str) -> None:
    """``--name`` / ``--no_name``; None when neither is given (then trainable.json or the default)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help)
    group.add_argument(
        f"--no_{name}", dest=name, action="store_false", default=None, help=f"turn --{name} off"
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI (LISA's merge flags; options left unset come from trainable.json, then the defaults)."""
    p = argparse.ArgumentParser(
        description="Merge trained LFLLM weights (LoRA, [SEG] head, SAM decoder, token rows) into the "
        "base and save a Hugging Face directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--version", default=None, help="base HF LLaVA dir (or a merged LFLLM dir); trainable.json"
    )
    p.add_argument("--vision_pretrained", default=None, help="SAM checkpoint; default from trainable.json")
    p.add_argument("--weight", required=True, help="trainable.safetensors, a DeepSpeed ckpt dir, or a .bin")
    p.add_argument("--save_path", required=True, help="output HF directory")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: its 'latest' file)")
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES), help="dtype of the saved model")
    p.add_argument("--max_shard_size", default="5GB", help="safetensors shard size")
    t = p.add_argument_group("training options (default: trainable.json next to --weight, else LISA's)")
    t.add_argument("--lora_r", type=int, default=None, help="8")
    t.add_argument("--lora_alpha", type=int, default=None, help="16")
    t.add_argument("--lora_dropout", type=float, default=None, help="0.05")
    t.add_argument("--lora_target_modules", default=None, help="q_proj,v_proj")
    _switch(t, "train_mask_decoder", "the SAM mask decoder was trained (default: on)")
    t.add_argument("--out_dim", type=int, default=None, help="[SEG] projection width (must be SAM's)")
    t.add_argument("--conv_type", default="llava_v1", choices=["llava_v1", "llava_llama_2"])
    _switch(t, "use_mm_start_end", "visual placeholders wrapped in <im_start>/<im_end> (default: on)")
    _switch(t, "caam", "Center Angular Aggregation Module (default: on)")
    _switch(t, "depth", "<DEPTH> tokens (default: on)")
    t.add_argument("--caam_target", default=None, choices=["clip", "sam", "both"])
    t.add_argument("--caam_mode", default=None, choices=["fixed", "learned", "occlusion"])
    t.add_argument("--caam_views", default=None)
    t.add_argument("--depth_range", default=None, help="'lo,hi' disparity px mapped to black..white")
    t.add_argument("--depth_projector", default=None, choices=["shared", "separate"])
    c = p.add_argument_group("accepted for compatibility with LISA's command lines")
    c.add_argument("--vision-tower", "--vision_tower", dest="vision_tower", default=None)
    c.add_argument("--image_size", type=int, default=None)
    c.add_argument("--model_max_length", type=int, default=None)
    c.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1)
    return p


def _from_dict(cls: type, values: dict[str, Any] | None) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in (values or {}).items() if k in names}
    if "depth_range" in kwargs:
        kwargs["depth_range"] = tuple(kwargs["depth_range"])
    return cls(**kwargs)


def resolve_options(
    args: argparse.Namespace, meta: dict[str, Any] | None
) -> tuple[ModelOptions, TrainableOptions]:
    """Options of the training run: flags given on the command line, else trainable.json, else defaults."""
    meta = meta or {}
    model_opts = _from_dict(ModelOptions, meta.get("model_options"))
    train_opts = _from_dict(TrainableOptions, meta.get("trainable_options"))
    flag_to_field = {"caam": "use_caam", "depth": "use_depth"}
    for flag in (
        "use_mm_start_end",
        "caam",
        "depth",
        "caam_target",
        "caam_mode",
        "caam_views",
        "depth_projector",
    ):
        if getattr(args, flag) is not None:
            model_opts = dataclasses.replace(
                model_opts, **{flag_to_field.get(flag, flag): getattr(args, flag)}
            )
    if args.depth_range is not None:
        try:
            lo, hi = (float(v) for v in args.depth_range.split(","))
        except ValueError:
            raise ValueError(f"--depth_range {args.depth_range!r}: expected 'lo,hi', e.g. '-1,1'") from None
        model_opts = dataclasses.replace(model_opts, depth_range=(lo, hi))
    for flag in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "train_mask_decoder"):
        if getattr(args, flag) is not None:
            train_opts = dataclasses.replace(train_opts, **{flag: getattr(args, flag)})
    return model_opts, train_opts


# --------------------------------------------------------------------------------------- main
def save_merged(
    model: LFLLMForCausalLM,
    tokenizer: Any,
    version: str | Path,
    save_path: str | Path,
    max_shard_size: str,
    info: dict[str, Any],
) -> Path:
    """Write the model (sharded safetensors + config), tokenizer, image processor and ``merge_info.json``."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor.from_pretrained(version).save_pretrained(out)
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2, default=str))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the merge; returns the output directory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    meta = read_meta(args.weight, args.tag)
    version = args.version or (meta or {}).get("version")
    vision_pretrained = args.vision_pretrained or (meta or {}).get("vision_pretrained")
    if version is None:
        parser.error(f"--version is required (no {TRAINABLE_META} next to {args.weight} names the base)")
    if args.vision_tower:
        print(f"note: --vision-tower {args.vision_tower} ignored; the CLIP tower comes from --version")
    model_opts, train_opts = resolve_options(args, meta)
    dtype = DTYPES[args.precision]
    # Read the trained tensors first: a DeepSpeed checkpoint is parsed (and released) before the base exists.
    source = open_weights(args.weight, args.tag)
    print(f"weights: {source.path} ({source.kind}, {len(source.names())} tensors)")
    model, tokenizer = build_lfllm(version, vision_pretrained, model_opts, dtype)
    if args.out_dim is not None and args.out_dim != model.config.out_dim:
        parser.error(f"--out_dim {args.out_dim}: the SAM in {vision_pretrained} takes {model.config.out_dim}")
    wrapped = make_trainable(model, train_opts)
    count = load_trainable(wrapped, source)
    source_kind = source.kind
    del source
    merged = merge(wrapped)
    info = {
        "source": str(args.weight),
        "source_kind": source_kind,
        "tensors_loaded": count,
        "version": str(version),
        "vision_pretrained": None if vision_pretrained is None else str(vision_pretrained),
        "precision": args.precision,
        "conv_type": args.conv_type,
        "model_options": dataclasses.asdict(model_opts),
        "trainable_options": dataclasses.asdict(train_opts),
        "trained": {k: (meta or {}).get(k) for k in ("global_step", "epoch")},
    }
    out = save_merged(merged, tokenizer, version, args.save_path, args.max_shard_size, info)
    print(f"merged {count} trained tensors into {version}; saved {args.precision} model to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
