"""Model-ready referring-segmentation samples: encoder geometry + prompts + tokens on top of scenes.

``ReferSegDataset`` wraps a :class:`dataset.scenes.SceneDataset` (raw arrays at original resolution) and
produces what :func:`dataset.collate.collate_batch` batches: uint8 views at CLIP and SAM geometry (the
neighbours only for the encoders CAAM feeds), disparity at both geometries, tokenised conversations and
the GT masks at original resolution. Training and validation differ only in the prompt randomness, and in
training with ILVC answers (``ilvc``, ``dataset/regions.py``): a share of the one-target expressions is answered
"[SEG] <region> description [SEG]", with the target's masked crop and its mask once per ``[SEG]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from transformers import PreTrainedTokenizerBase

from dataset.collate import TokenSpec, encode_conversation
from dataset.errors import DataError, LightFieldError
from dataset.lightfield import read_rgb
from dataset.prompts import BOX_STEP, build_task_turns, build_turns, ilvc_answer
from dataset.regions import IlvcSpec, RegionCrop, region_crop
from dataset.scenes import SceneDataset
from dataset.transforms import clip_geometry, disparity_scale, longest_side_shape, sam_geometry
from utils.batch import Sample
from utils.boxes import box_text, mask_box, parse_box
from utils.conversation import PROMPT_ORDERS, render_segments


@dataclass(frozen=True)
class SampleSpec:
    """What a sample must contain for a given model (derived from its config)."""

    clip_size: int
    sam_size: int | None  # None: no SAM (the light mask head); no SAM-geometry keys
    use_depth: bool
    caam_clip: bool
    caam_sam: bool
    use_mm_start_end: bool
    conv_type: str = "llava_v1"
    pack_conversations: bool = False
    prompt_order: str = PROMPT_ORDERS[0]  # the model option's default (model.options)
    answer_box: bool = False
    depth_stream: bool = False  # the disparity at SAM geometry reaches the mask decoder
    max_positions: int | None = None  # the language model's positions (max_position_embeddings)
    new_tokens: int = 0  # positions a conversation leaves free for generation (prediction: max_new_tokens)
    gres: bool = False  # the model has [REJ]: a no-target expression is answered with it
    exprs_per_question: int = 1  # > 1: several expressions per question, a slot each (GRES format)

    @classmethod
    def from_model_config(
        cls, config: Any, conv_type: str = "llava_v1", pack: bool = False, exprs_per_question: int = 1
    ) -> SampleSpec:
        """Read sizes and switches from an ``LFLLMConfig``."""
        caam = bool(config.use_caam)
        light = getattr(config, "mask_head", "sam") == "light"
        return cls(
            # the light head's detail pass sets the CLIP-geometry size (the LLM's view is pooled from it)
            clip_size=int(getattr(config, "light_detail_size", 0) or config.vision_config.image_size),
            sam_size=None if light else config.sam_config["img_size"],
            use_depth=bool(config.use_depth),
            caam_clip=caam and config.caam_target in ("clip", "both"),
            caam_sam=caam and not light and config.caam_target in ("sam", "both"),
            use_mm_start_end=bool(config.use_mm_start_end),
            conv_type=conv_type,
            pack_conversations=pack,
            prompt_order=str(config.prompt_order),
            answer_box=bool(config.answer_box),
            depth_stream=bool(getattr(config, "depth_stream", False)),
            max_positions=getattr(getattr(config, "text_config", None), "max_position_embeddings", None),
            gres=bool(getattr(config, "gres", False)),
            exprs_per_question=exprs_per_question,
        )

    @property
    def needs_disparity(self) -> bool:
        return self.use_depth or self.caam_clip or self.sam_disparity

    @property
    def sam_disparity(self) -> bool:
        """Whether samples carry the disparity at SAM geometry (CAAM on SAM, the depth stream)."""
        return self.caam_sam or self.depth_stream


def check_box_text(tokenizer: PreTrainedTokenizerBase) -> None:
    """``ValueError`` unless ``tokenizer`` writes box text back unchanged (``answer_box`` answers hold
    ``[x0, y0, x1, y1]``; a tokenizer without digits would turn them into unknown tokens)."""
    probe = "[0.10, 0.25, 0.60, 0.90]"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if parse_box(back) != parse_box(probe):
        raise ValueError(
            f"answer_box: the tokenizer cannot write box coordinates ({probe!r} decodes as {back!r}); "
            "use a tokenizer with digits (every LLaVA's has them) or drop --answer_box"
        )


def _chw(views: np.ndarray) -> torch.Tensor:
    """(K, H, W, 3) uint8 -> (K, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(views.transpose(0, 3, 1, 2)))


class ReferSegDataset(torch.utils.data.Dataset):
    """Model-ready samples; ``train=True`` draws random question/answer templates (seeded per item)."""

    def __init__(
        self,
        scenes: SceneDataset,
        tokenizer: PreTrainedTokenizerBase,
        spec: SampleSpec,
        tokens: TokenSpec,
        *,
        train: bool,
        with_answers: bool = True,
        seed: int = 0,
        features: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None,
        explanatory: float = -1.0,
        ilvc: IlvcSpec | None = None,
    ) -> None:
        """``features``: with a feature cache, ``features(raw_scene) -> {"image_tokens", "depth_tokens",
        "sam_embeddings"}`` replaces the images (the scenes then come without pixels). ``scenes`` may be a
        task mix (:class:`dataset.tasks.mix.TaskMix`): an item's ``task`` chooses its prompts
        (:func:`dataset.prompts.build_task_turns`; ``explanatory``: ``--explanatory``). ``ilvc``: ILVC answers
        in training (``--ilvc``; the model must have ``<region>``, ``tokens.region_id``)."""
        self.scenes, self.tokenizer, self.spec, self.tokens = scenes, tokenizer, spec, tokens
        self.explanatory = explanatory
        self.ilvc = ilvc if ilvc is not None and ilvc.share > 0 and train and with_answers else None
        if self.ilvc is not None:
            if tokens.region_id is None:
                raise ValueError("--ilvc: the model has no <region> token; build it with region_token=True")
            if spec.answer_box or spec.exprs_per_question > 1:
                raise ValueError(
                    "--ilvc: not with --answer_box or --exprs_per_question > 1 (one [SEG] pair each)"
                )
        self.features = features
        self.train, self.with_answers, self.seed, self.epoch = train, with_answers, seed, 0
        if spec.answer_box and with_answers:
            check_box_text(tokenizer)

    def __len__(self) -> int:
        return len(self.scenes)

    def set_epoch(self, epoch: int) -> None:
        """Reseed per-item sampling for ``epoch`` (expressions and templates)."""
        self.epoch = epoch
        if hasattr(self.scenes, "set_epoch"):
            self.scenes.set_epoch(epoch)

    def _images(self, raw: dict[str, Any]) -> dict[str, Any]:
        spec, disp = self.spec, raw["disparity"]
        if spec.needs_disparity and disp is None:
            raise LightFieldError(raw["scene_dir"], "this model needs a disparity map and the scene has none")
        center = raw["center"][None]
        clip_in = np.concatenate([center, raw["views"]]) if spec.caam_clip else center
        sam_in = np.concatenate([center, raw["views"]]) if spec.caam_sam else center
        clip_views, clip_disp, clip_scale = clip_geometry(clip_in, disp, spec.clip_size)
        clip_t = _chw(clip_views)
        sample = {
            "clip_center": clip_t[0],
            "clip_views": clip_t[1:] if spec.caam_clip else None,
            "clip_disparity": None if clip_disp is None else torch.from_numpy(clip_disp),
            "clip_scale": clip_scale,
            "original_hw": raw["center"].shape[:2],
        }
        if spec.sam_size is None:  # the light head: no SAM geometry
            return sample
        sam_views, sam_disp, sam_hw, sam_scale = sam_geometry(
            sam_in, disp if spec.sam_disparity else None, spec.sam_size
        )
        sam_t = _chw(sam_views)
        return {
            **sample,
            "sam_center": sam_t[0],
            "sam_views": sam_t[1:] if spec.caam_sam else None,
            "sam_disparity": None if sam_disp is None else torch.from_numpy(sam_disp),
            "sam_scale": sam_scale,
            "sam_resized_hw": sam_hw,
        }

    def _geometry(self, hw: tuple[int, int]) -> dict[str, Any]:
        """The per-scene geometry the model needs besides its encodings (no image read)."""
        h, w = (int(v) for v in hw)
        spec = self.spec
        out = {"clip_scale": disparity_scale(h, w, spec.clip_size, "clip"), "original_hw": (h, w)}
        if spec.sam_size is not None:
            out["sam_scale"] = disparity_scale(h, w, spec.sam_size, "sam")
            out["sam_resized_hw"] = longest_side_shape(h, w, spec.sam_size)
        return out

    def conversations(
        self,
        sentences: list[str],
        rng: random.Random | None,
        masks: np.ndarray | None = None,
        no_target: list[bool] | None = None,
        ilvc_answers: list[str | None] | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """Tokenised conversations for ``sentences`` (one [SEG] each, in sentence order; a GRES model's
        answer to a sentence flagged in ``no_target`` is [REJ]); an ``answer_box`` model's answers state the
        box of each of ``masks`` (k, H, W), one per sentence; a sentence with an answer in ``ilvc_answers``
        is answered with it (the ILVC form)."""
        spec = self.spec
        rejects = [bool(v) for v in no_target] if no_target is not None else [False] * len(sentences)
        # A model without [REJ] is scored on no-target expressions as it answers them, with [SEG] (its mask
        # against the empty target), but never trained on them.
        if any(rejects) and self.with_answers and self.train and not spec.gres:
            sent = sentences[rejects.index(True)]
            raise ValueError(
                f"{sum(rejects)} expression(s) name no object (e.g. {sent!r}: a no-target ref, ann_id [-1]); "
                "only a GRES model can answer them: build it with --gres"
            )
        boxes = None
        if spec.answer_box and self.with_answers:
            if masks is None or len(masks) != len(sentences):
                raise ValueError("answer_box: every expression needs its mask to state its box")
            h, w = masks.shape[1:]
            boxes = ["" if r else box_text(mask_box(m), h, w, BOX_STEP) for m, r in zip(masks, rejects)]
        convs = build_turns(
            sentences,
            use_depth=spec.use_depth,
            use_mm_start_end=spec.use_mm_start_end,
            pack=spec.pack_conversations,
            rng=rng,
            with_answer=self.with_answers,
            order=spec.prompt_order,
            boxes=boxes,
            rejects=rejects if spec.gres else None,
            exprs_per_question=spec.exprs_per_question,
            ilvc_answers=ilvc_answers,
        )
        return self._encode(convs)

    def task_conversations(
        self, raw: dict[str, Any], rng: random.Random | None
    ) -> tuple[list[tuple[list[int], list[int]]], list[bool]]:
        """Tokenised conversations of a ``sem_seg``, ``reason_seg`` or ``vqa`` item, and per mask whether
        its answer asks for it (:func:`dataset.prompts.build_task_turns`)."""
        spec = self.spec
        if spec.answer_box or spec.gres or spec.exprs_per_question > 1:
            raise ValueError(
                f"task {raw['task']}: LISA's task mix trains one-[SEG] answers; not with --answer_box, --gres "
                "or --exprs_per_question"
            )
        convs, keep = build_task_turns(
            raw,
            use_depth=spec.use_depth,
            use_mm_start_end=spec.use_mm_start_end,
            pack=spec.pack_conversations,
            rng=rng,
            with_answer=self.with_answers,
            order=spec.prompt_order,
            explanatory=self.explanatory,
        )
        return self._encode(convs), keep

    def _encode(self, convs: list[list[tuple[str, str | None]]]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each conversation, each checked against the model's positions."""
        out = [
            encode_conversation(self.tokenizer, render_segments(self.spec.conv_type, c), self.tokens)
            for c in convs
        ]
        for ids, _ in out:
            self._check_positions(ids)
        return out

    def _check_positions(self, ids: list[int]) -> None:
        """``ValueError`` when a conversation (plus the tokens kept free for generation) needs more
        positions than the language model has: past them it answers from positions it never learned."""
        limit, reserve = self.spec.max_positions, self.spec.new_tokens
        if not limit or len(ids) + reserve <= limit:
            return
        visual = sum(1 for t in ids if t in (self.tokens.image_id, self.tokens.depth_id))
        plus = f" + {reserve} tokens to generate (--max_new_tokens)" if reserve else ""
        raise ValueError(
            f"prompt of {len(ids)} tokens ({len(ids) - visual} text + {visual} image/depth){plus} exceeds "
            f"the model's {limit} positions (max_position_embeddings): shorten the expression"
            + (" or lower --max_new_tokens" if reserve and len(ids) < limit else "")
        )

    def __getitem__(self, index: int) -> Sample:
        raw = self.scenes[index]
        rng = random.Random(hash((self.seed, self.epoch, index))) if self.train else None
        if self.features is not None:
            sample: Sample = {**self._geometry(raw["hw"]), **self.features(raw)}
        else:
            sample = self._images(raw)
        masks = raw.get("masks")  # None for prediction-only scenes (chat)
        task = raw.get("task", "refer_seg")
        keep = None
        try:
            if task == "refer_seg":
                regions = self._regions(raw, index)
                sample["conversations"] = self.conversations(
                    raw["sentences"], rng, raw.get("masks"), raw.get("no_target"),
                    None if regions is None else [None if r is None else r[0] for r in regions],
                )  # fmt: skip
                if regions is not None and any(r is not None for r in regions):
                    sample.update(self._region_keys(regions))
                    twice = [k for k, r in enumerate(regions) for _ in range(1 if r is None else 2)]
                    masks = masks[twice]  # both [SEG]s of an ILVC answer are trained on its mask
            else:
                sample["conversations"], keep = self.task_conversations(raw, rng)
        except ValueError as exc:  # a DataError rebuilds cleanly from a DataLoader worker
            raise DataError(raw["scene_dir"], str(exc)) from exc
        sentences, subsets = raw["sentences"], raw["subsets"]
        no_target = raw.get("no_target") or [False] * len(sentences)
        if keep is not None and not all(keep):  # answers that explain instead of segmenting: no mask
            sentences, subsets, no_target = (
                [v for v, k in zip(x, keep) if k] for x in (sentences, subsets, no_target)
            )
            masks = None if masks is None else masks[np.asarray(keep, dtype=bool)]
        sample.update(
            masks=None if masks is None else torch.from_numpy(masks),
            task=task,
            image_id=raw["image_id"],
            ds=raw["ds"],
            sentences=sentences,
            subsets=subsets,
            no_target=no_target,
            scene_dir=raw["scene_dir"],
            center_path=self._center_path(raw["scene_dir"]),
        )
        return sample

    def _regions(self, raw: dict[str, Any], index: int) -> list[tuple[str, RegionCrop] | None] | None:
        """Per expression of a referring item, (ILVC answer, crop) where its answer takes the ILVC form, else
        None; None without ILVC. Each expression draws once from its own generator (seeded by seed, epoch,
        index), so the prompts' draws are those of a run without ILVC; one-target expressions with a
        non-empty mask and an attributes record qualify."""
        spec = self.ilvc
        if spec is None or raw.get("masks") is None or raw.get("ann_ids") is None:
            return None
        rng = random.Random(hash((self.seed, self.epoch, index, 0x1C)))
        no_target = raw.get("no_target") or [False] * len(raw["sentences"])
        center = None
        out: list[tuple[str, RegionCrop] | None] = []
        for k, ann_ids in enumerate(raw["ann_ids"]):
            drawn = rng.random() < spec.share
            mask = raw["masks"][k] == 1
            text = None
            if drawn and len(ann_ids) == 1 and not no_target[k] and mask.any():
                text = spec.describer.description(raw["ds"], raw["image_id"], ann_ids[0])
            if text is None:
                out.append(None)
                continue
            if center is None and spec.crop == "centre":  # a feature cache's scene holds no pixels
                center = raw["center"] if "center" in raw else read_rgb(self._center_path(raw["scene_dir"]))
            out.append((ilvc_answer(text, rng), region_crop(center, mask, spec.size)))
        return out

    def _region_keys(self, regions: list[tuple[str, RegionCrop] | None]) -> dict[str, torch.Tensor]:
        """The sample's ``region_*`` keys (:class:`utils.batch.Sample`) of the ILVC answers in ``regions``."""
        crops = [(k, r[1]) for k, r in enumerate(regions) if r is not None]
        out = {
            "region_masks": torch.stack([c.mask for _, c in crops]),
            # one conversation per expression, or one packed conversation holding every turn
            "region_conv": torch.tensor([0 if self.spec.pack_conversations else k for k, _ in crops]),
        }
        if self.ilvc.crop == "caam":
            out["region_boxes"] = torch.stack([c.box for _, c in crops])
        else:
            out["region_pixels"] = torch.stack([c.pixels for _, c in crops])
        return out

    def _center_path(self, scene_dir: str) -> str:
        """The centre-view file of a scene (the image itself for 2D datasets)."""
        path = Path(scene_dir)
        return str(path / self.scenes.layout.view_name((0, 0))) if path.is_dir() else str(path)
