"""The tiny LLaVA + SAM base of the tests and the quickstart: tokenizer, random LLaVA, (pretrained) tiny SAM.

``tiny`` (:data:`model.presets.PRESETS`) is built from configs with random init and a tokenizer trained
offline on the synthetic corpus; it is written to disk in exactly the layout of ``llava-hf/llava-1.5-7b-hf``
(config.json, safetensors, tokenizer, preprocessor_config.json) and SAM in the official state-dict format,
so that it goes through the same loading code as the real weights. The tiny SAM can be pretrained on
train-split point prompts (:func:`pretrain_tiny_sam`), standing in for SAM's own pretraining.
``scripts/make_tiny_base.py`` is the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    LlamaTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from dataset.prompts import ANSWER_TEMPLATES, QUESTION_TEMPLATES
from dataset.scenes import SceneDataset, split_datasets
from model.presets import Preset, get_preset, llava_config
from model.sam import build_sam, sam_config
from training.pretrain.sam import Prompted, sam_input, train_sam
from utils.conversation import SYSTEM_PROMPT
from utils.options import add_option_flags, option, options_from_args


def template_corpus() -> list[str]:
    """Every fixed text the prompts use (system prompt, questions, answers, chat scaffolding)."""
    texts = [SYSTEM_PROMPT, *ANSWER_TEMPLATES]
    texts += [q.format(expr="the object") for q in QUESTION_TEMPLATES]
    texts += ["USER: ASSISTANT: </s>", "[INST] <<SYS>> <</SYS>> [/INST]"]
    return texts


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A Llama-style tokenizer trained offline on ``corpus`` + the prompt templates, with ``<image>`` and
    ``<pad>`` already added (as in ``llava-1.5-7b-hf``).

    Pieces never span a space, as in LLaMA's sentencepiece model (``split_by_whitespace``). The default
    ``tokenizers`` Llama pre-tokenizer does not split, and on a small corpus BPE then learns whole phrases
    ("▁the▁orange▁bike▁that▁is▁in▁front▁of…") as single tokens: an expression becomes one random, frozen
    embedding that no other expression shares, and nothing learnt on the train split carries over to val.
    """
    texts = list(corpus) + template_corpus() * 20
    base = LlamaTokenizer()
    base.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    tok = base.train_new_from_iterator(texts, vocab_size=vocab_size)
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tok


@dataclass(frozen=True)
class SamPretrainOptions:
    """Class-agnostic point-prompt pretraining of the tiny SAM (SAM's own objective, in miniature).

    Each step takes ``images_per_step`` train images, prompts every annotated object of each (at most
    ``max_objects``) with one foreground point drawn uniformly inside its mask, through segment_anything's
    own prompt encoder, and trains the image encoder, prompt encoder and mask decoder on sigmoid BCE + dice
    at the image's own resolution (AdamW, linear warm-up, cosine decay).
    """

    steps: int = 0
    images_per_step: int = 4
    max_objects: int = 4
    lr: float = 3e-3
    warmup: int = 10


def train_split_objects(
    dataset_dir: str | Path, datasets: str | Sequence[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre view (H, W, 3) uint8, object masks (K, H, W) uint8) of every train-split image.

    Only images whose refs are all in the train split are used (no val/test pixels or masks), each
    annotated object once.
    """
    scenes = SceneDataset(dataset_dir, datasets, "train", views=(), mode="val", with_disparity=False)
    out = []
    for index, scene in enumerate(scenes.scenes):
        ann = scenes.annotations[scene.ds_index]
        if any(r.image_id == scene.image_id and not r.in_split("train") for r in ann.refs):
            continue
        item = scenes[index]
        _, first = np.unique(np.asarray(item["ref_ids"]), return_index=True)
        masks = item["masks"][np.sort(first)]
        masks = masks[masks.reshape(len(masks), -1).any(1)]
        if len(masks):
            out.append((item["center"], masks))
    if not out:
        raise ValueError(f"{dataset_dir}: no train-split image with an annotated object to pretrain SAM on")
    return out


def pretrain_tiny_sam(
    sam: Sam, objects: Sequence[tuple[np.ndarray, np.ndarray]], options: SamPretrainOptions, seed: int = 0
) -> dict[str, float]:
    """Train ``sam`` in place on point prompts for ``options.steps`` steps (see :class:`SamPretrainOptions`).

    Images go through the same geometry and normalisation as in the model (longest side to the SAM input
    size, normalise, zero pad). Deterministic for a given seed and thread count. Returns the mean loss and
    mask IoU of the first and of the last 10 % of the steps (``first_loss``, ``first_iou``, ``loss``,
    ``iou``).
    """
    size = sam.image_encoder.img_size
    data = []
    for center, masks in objects:
        x, hw, _ = sam_input(center, size)
        data.append((x, torch.from_numpy(masks).float(), hw))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(sam.parameters(), lr=options.lr, weight_decay=0.0)
    total = max(1, options.steps)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / max(1, options.warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))

    def items_at(step: int) -> list[Prompted]:
        items = []
        for i in torch.randperm(len(data), generator=gen)[: options.images_per_step].tolist():
            x, masks, (h, w) = data[i]
            gt = masks[torch.randperm(len(masks), generator=gen)[: options.max_objects]]
            points = []
            for m in gt:
                ys, xs = torch.nonzero(m, as_tuple=True)
                k = int(torch.randint(len(ys), (1,), generator=gen))
                points.append([(float(xs[k]) + 0.5) * w / m.shape[1], (float(ys[k]) + 0.5) * h / m.shape[0]])
            items.append(Prompted(x, gt, torch.tensor(points).view(-1, 1, 2), None, (h, w)))
        return items

    log = train_sam(
        sam, opt, start=0, steps=options.steps, items_at=items_at, lr_at=lambda step: options.lr * schedule(step),
        iou_weight=0.0, desc="pretrain tiny SAM", progress=options.steps >= 50,
    )  # fmt: skip
    sam.eval()
    n = max(1, len(log) // 10)
    head, tail = log[:n] or [(float("nan"),) * 2], log[-n:] or [(float("nan"),) * 2]
    return {
        "first_loss": sum(v[0] for v in head) / len(head),
        "first_iou": sum(v[1] for v in head) / len(head),
        "loss": sum(v[0] for v in tail) / len(tail),
        "iou": sum(v[1] for v in tail) / len(tail),
    }


def new_llava(preset: Preset, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlavaForConditionalGeneration:
    """A randomly initialised HF LLaVA of ``preset``'s shapes for ``tokenizer`` (seeded)."""
    cfg = llava_config(
        preset,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


def save_llava(
    llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, llava_dir: str | Path
) -> Path:
    """Write ``llava_dir`` in the layout of ``llava-hf/llava-1.5-7b-hf`` (config, safetensors, tokenizer,
    ``preprocessor_config.json`` for the tower's input size). Returns ``llava_dir``."""
    llava_dir = Path(llava_dir)
    llava.save_pretrained(llava_dir)
    tokenizer.save_pretrained(llava_dir)
    size = llava.config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(llava_dir)
    return llava_dir


def write_tiny_base(
    out_dir: str | Path,
    corpus: Iterable[str],
    seed: int = 0,
    sam_objects: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    sam_pretrain: SamPretrainOptions | None = None,
) -> dict[str, Path]:
    """Write ``out_dir/llava`` (HF LLaVA directory) and ``out_dir/sam_tiny.pth`` (SAM state dict).

    With ``sam_pretrain.steps > 0`` the tiny SAM is pretrained on ``sam_objects`` (train-split images and
    masks, see :func:`train_split_objects`) with :func:`pretrain_tiny_sam` before it is saved, so that it
    plays the part of the pretrained SAM of the real stack; its first/last losses and IoUs go to
    ``out_dir/sam_pretrain.json``. Returns the two paths. Deterministic for a
    given corpus, objects, options, seed (and thread count, when pretraining).
    """
    out_dir = Path(out_dir)
    preset = get_preset("tiny")
    tok = train_tiny_tokenizer(corpus, preset.vocab_size)
    llava_dir = save_llava(new_llava(preset, tok, seed), tok, out_dir / "llava")
    torch.manual_seed(seed)
    sam = build_sam(sam_config(preset.sam_variant))
    if sam_pretrain is not None and sam_pretrain.steps > 0:
        if not sam_objects:
            raise ValueError("SAM pretraining needs train-split objects (see train_split_objects)")
        result = pretrain_tiny_sam(sam, sam_objects, sam_pretrain, seed=seed)
        record = {"options": vars(sam_pretrain), "images": len(sam_objects), **result}
        (out_dir / "sam_pretrain.json").write_text(json.dumps(record, indent=2))
    sam_path = out_dir / "sam_tiny.pth"
    torch.save(sam.state_dict(), sam_path)
    return {"llava": llava_dir, "sam": sam_path}


def dataset_sentences(dataset_dir: str | Path, datasets: str) -> list[str]:
    """Every sentence of the refs of ``datasets`` (``a||b`` allowed). Raises ``FileNotFoundError`` /
    ``ValueError`` naming the JSON file when it is missing, malformed or holds no sentence."""
    sentences: list[str] = []
    for ds in split_datasets(datasets):
        path = Path(dataset_dir) / "refer_seg" / ds / f"{ds}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: referring-expression JSON not found (check --dataset_dir / --ds)"
            )
        try:
            refs = json.loads(path.read_text())
            found = [s["sent"] for ref in refs for s in ref["sentences"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: expected a list of refs with sentences[{{'sent': ...}}] ({exc})"
            ) from exc
        if not found:
            raise ValueError(f"{path}: holds no sentence to train the tokenizer on")
        sentences += found
    return sentences


@dataclass(frozen=True)
class TinyBaseOptions:
    """The command line of ``scripts/make_tiny_base.py``.

    Attributes:
        out: output folder, gets ``llava/`` and ``sam_tiny.pth`` (``--out``, required).
    """

    out: Path
    dataset_dir: str = option("./dataset", "root holding refer_seg/<ds>/<ds>.json")
    ds: str = option("ref-urbanlf-syn", "dataset name(s), '||'-separated")
    seed: int = option(0, "seed of the random weights (and of the SAM pretraining)")
    sam_pretrain_steps: int = option(
        0,
        "pretrain the tiny SAM on train-split point prompts for N steps (stands in for SAM's own "
        "pretraining; 0 = random SAM)",
    )
    sam_pretrain_lr: float = option(SamPretrainOptions.lr, "learning rate of the SAM pretraining")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--out`` and one flag per :class:`TinyBaseOptions` option."""
    p = argparse.ArgumentParser(description="Write a tiny LLaVA + SAM base (random weights) for CPU runs.")
    p.add_argument("--out", required=True, help="output folder (gets llava/ and sam_tiny.pth)")
    add_option_flags(p, TinyBaseOptions)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TinyBaseOptions:
    """The command line as :class:`TinyBaseOptions`."""
    args = build_parser().parse_args(argv)
    return options_from_args(TinyBaseOptions, args, TinyBaseOptions(out=Path(args.out)))


def make_tiny_base(options: TinyBaseOptions) -> dict[str, Path]:
    """Write the tiny base ``options`` describe (tokenizer trained on the dataset's sentences, SAM
    pretrained when ``sam_pretrain_steps > 0``) and print what was done; returns ``{"llava": dir, "sam":
    path}``."""
    corpus = dataset_sentences(options.dataset_dir, options.ds)
    pretrain = SamPretrainOptions(steps=options.sam_pretrain_steps, lr=options.sam_pretrain_lr)
    objects = train_split_objects(options.dataset_dir, options.ds) if pretrain.steps > 0 else None
    paths = write_tiny_base(
        options.out, corpus, seed=options.seed, sam_objects=objects, sam_pretrain=pretrain
    )
    print(f"tokenizer trained on {len(corpus)} sentences")
    if objects:
        done = json.loads((options.out / "sam_pretrain.json").read_text())
        print(
            f"tiny SAM pretrained {pretrain.steps} steps on {len(objects)} train images: point-prompt loss "
            f"{done['first_loss']:.3f} -> {done['loss']:.3f}, train mask IoU {done['first_iou']:.3f} -> "
            f"{done['iou']:.3f}"
        )
    print(f"--version {paths['llava']} --vision_pretrained {paths['sam']}")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Entry point; returns ``{"llava": dir, "sam": path}``."""
    return make_tiny_base(parse_args(argv))
