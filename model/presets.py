"""Model-size presets (a registry, not if-chains) and the tiny HF LLaVA base used by tests and the quickstart.

``tiny`` is built from configs with random init and a tokenizer trained offline on the synthetic corpus;
it is written to disk in exactly the layout of ``llava-hf/llava-1.5-7b-hf`` (config.json, safetensors,
tokenizer, preprocessor_config.json) and SAM in the official state-dict format, so that it goes through
the same loading code as the real weights. ``7b`` / ``13b`` are the full-size shapes (for benchmarks with
random init; real runs load them from the HF directories).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from tokenizers import pre_tokenizers
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from dataset.prompts import ANSWER_TEMPLATES, QUESTION_TEMPLATES
from dataset.transforms import sam_geometry
from model.losses import mask_losses
from model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, build_sam, sam_config
from utils.conversation import SYSTEM_PROMPT
from utils.metrics import mask_iou_stats


@dataclass(frozen=True)
class Preset:
    """Shapes of one model size: language model, CLIP tower, SAM variant."""

    text: dict[str, Any]
    vision: dict[str, Any]
    sam_variant: str
    vocab_size: int = 32000
    extra: dict[str, Any] = field(default_factory=dict)


_CLIP_L14_224 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            # HF's 0.02 is a constant tuned for widths in the thousands (std·sqrt(width) = 1.28 at 4096).
            # At width 64 it shrinks every projection ~6x: uniform attention, LM logits near 0, and a
            # [SEG] projection 60x smaller than SAM's prompt embeddings. Keep the 7B's per-layer gain.
            initializer_range=0.02 * (4096 / 64) ** 0.5,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        ),
        sam_variant="tiny",
        vocab_size=1024,
    ),
    "7b": Preset(
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
        vision=_CLIP_L14_224,
        sam_variant="vit_h",
    ),
    "13b": Preset(
        text=dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
        ),
        vision=_CLIP_L14_224,
        sam_variant="vit_h",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def llava_config(
    preset: Preset, vocab_size: int, image_token_id: int, pad_token_id: int | None
) -> LlavaConfig:
    """An HF ``LlavaConfig`` with the preset's shapes (CLIP features from layer -2, CLS dropped)."""
    text = LlamaConfig(**preset.text, vocab_size=vocab_size, pad_token_id=pad_token_id)
    vision = CLIPVisionConfig(**preset.vision)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.pad_token_id = pad_token_id
    return cfg


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
    from dataset.scenes import SceneDataset  # data layer: imported only when pretraining is asked for

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
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    data = []
    for center, masks in objects:
        views, _, (h, w), _ = sam_geometry(center[None], None, size)
        x = (torch.from_numpy(views[0]).permute(2, 0, 1).float() - mean) / std
        x[:, h:] = 0
        x[:, :, w:] = 0
        data.append((x, torch.from_numpy(masks).float(), (h, w)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sam.train()
    opt = torch.optim.AdamW(sam.parameters(), lr=options.lr, weight_decay=0.0)
    total = max(1, options.steps)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / max(1, options.warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    pe = sam.prompt_encoder
    log: list[tuple[float, float]] = []
    for _ in tqdm(range(options.steps), desc="pretrain tiny SAM", unit="step", disable=options.steps < 50):
        idx = torch.randperm(len(data), generator=gen)[: options.images_per_step].tolist()
        embeddings = sam.image_encoder(torch.stack([data[i][0] for i in idx]))
        preds, gts = [], []
        for j, i in enumerate(idx):
            _, masks, (h, w) = data[i]
            pick = torch.randperm(len(masks), generator=gen)[: options.max_objects]
            gt = masks[pick]
            points = []
            for m in gt:
                ys, xs = torch.nonzero(m, as_tuple=True)
                k = int(torch.randint(len(ys), (1,), generator=gen))
                points.append([(float(xs[k]) + 0.5) * w / m.shape[1], (float(ys[k]) + 0.5) * h / m.shape[0]])
            coords = torch.tensor(points).view(-1, 1, 2)
            labels = torch.ones(len(points), 1, dtype=torch.int)
            sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
            low_res, _ = sam.mask_decoder(
                image_embeddings=embeddings[j : j + 1],
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            preds.append(sam.postprocess_masks(low_res, (h, w), tuple(gt.shape[-2:]))[:, 0])
            gts.append(gt)
        bce, dice = mask_losses(preds, gts)
        loss = bce + dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            inter, union = zip(*(mask_iou_stats(p, g) for p, g in zip(preds, gts)))
            iou = float((torch.cat(inter) / torch.cat(union).clamp(min=1)).mean())
        log.append((loss.item(), iou))
    sam.eval()
    n = max(1, len(log) // 10)
    head, tail = log[:n] or [(float("nan"),) * 2], log[-n:] or [(float("nan"),) * 2]
    return {
        "first_loss": sum(v[0] for v in head) / len(head),
        "first_iou": sum(v[1] for v in head) / len(head),
        "loss": sum(v[0] for v in tail) / len(tail),
        "iou": sum(v[1] for v in tail) / len(tail),
    }


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
    cfg = llava_config(
        preset,
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(cfg)
    llava_dir = out_dir / "llava"
    llava.save_pretrained(llava_dir)
    tok.save_pretrained(llava_dir)
    size = preset.vision["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(llava_dir)
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
