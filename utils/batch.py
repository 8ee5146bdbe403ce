"""The sample and the batch: what ``dataset.refer_seg.ReferSegDataset`` yields (:class:`Sample`), and what
``dataset.collate.collate_batch`` makes and ``model.lfllm.LFLLMForCausalLM.forward_lf``,
``model.inference`` and ``training.trainer`` read. Documented once, here, with shapes.

Shapes: B scenes (images), V neighbour views, N conversations (all scenes' together, ``conv_image`` maps
each to its scene), L tokens, S the CLIP input size, T the SAM input size, k_i masks of scene i at its
original size (H_i, W_i). A key that a model configuration does not use is absent (not None): no
``clip_views`` without CAAM on CLIP, no ``clip_disparity`` without depth tokens, no ``sam_*`` key for the
light mask head (its CLIP-geometry images are at its detail size S), no ``gt_masks`` when predicting.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class Batch(TypedDict, total=False):
    """One collated batch (a plain ``dict`` at run time, so DeepSpeed and ``move_batch`` pass it through)."""

    clip_center: Tensor  # (B, 3, S, S) uint8 RGB centre view at CLIP geometry (resize + centre crop)
    clip_views: Tensor  # (B, V, 3, S, S) uint8 neighbours at CLIP geometry (CAAM on CLIP)
    clip_disparity: Tensor  # (B, S, S) float32 disparity in px at CLIP geometry (depth tokens / CAAM)
    clip_scale: Tensor  # (B,) float32 CLIP pixels per original pixel (rescales disparity for the warp)
    sam_center: Tensor  # (B, 3, T, T) uint8 centre view, longest side T, zero-padded bottom/right
    sam_views: Tensor  # (B, V, 3, T, T) uint8 neighbours at SAM geometry (CAAM on SAM)
    sam_disparity: Tensor  # (B, T, T) float32 disparity in px at SAM geometry (CAAM on SAM, depth stream)
    sam_scale: Tensor  # (B,) float32 SAM pixels per original pixel
    sam_resized_hw: Tensor  # (B, 2) int64 size of the resized (unpadded) image inside T x T
    original_hw: list[tuple[int, int]]  # B x (H_i, W_i)
    # from a feature cache (training.features) instead of the image keys above:
    image_tokens: Tensor  # (B, T, D) projected CLIP tokens of the (CAAM-aggregated) view
    depth_tokens: Tensor  # (B, T, D) projected CLIP tokens of the depth image (depth tokens on)
    sam_embeddings: Tensor  # (B, C, g, g) SAM image-encoder output of the (CAAM-aggregated) view
    sam_depth: Tensor  # (B, 2, 4g, 4g) the depth stream's input (model.depth.depth_grid; depth stream on)
    vision_features: Tensor  # (B, Pd, Dv) the light head's detail features (the tower before the projector)
    # ILVC answers (training with --ilvc; R regions, each one expression's target, S_t the tower's input size;
    # absent when no answer of the batch takes the form; per step, never from a feature cache):
    region_pixels: Tensor  # (R, 3, S_t, S_t) uint8 masked crop of the centre view (0 outside the mask)
    region_masks: Tensor  # (R, S_t, S_t) bool the target's mask in the crop
    region_boxes: Tensor  # (R, 4) float32 the crop box (x0, y0, x1, y1), original px (--ilvc_crop caam)
    region_conv: Tensor  # (R,) int64 conversation of each region, in the order of its <region> runs
    input_ids: Tensor  # (N, L) int64, visual placeholders expanded, right-padded
    labels: Tensor  # (N, L) int64, utils.tokens.IGNORE_INDEX outside the answers
    attention_mask: Tensor  # (N, L) int64, 1 on real tokens
    conv_image: Tensor  # (N,) int64 scene index of each conversation
    # gt_masks: in the [SEG] order of scene i (an ILVC answer's two [SEG]s: its mask twice); 255: ignored
    gt_masks: list[Tensor]  # B x (k_i, H_i, W_i) float {0, 1, 255}
    image_id: list[int | str]  # B scene ids
    ds: list[str]  # B dataset names
    sentences: list[list[str]]  # B x k_i expressions
    subsets: list[list[tuple[str, ...]]]  # B x k_i subset tags of each expression
    no_target: list[list[bool]]  # B x k_i: the expression names no object (GRES; its mask is empty)
    task: list[str]  # B tasks of LISA's mix (dataset.tasks.base.TASKS); refer_seg outside a mix
    scene_dir: list[str]  # B scene folders (or 2D image paths)
    center_path: list[str]  # B centre-view files


class Sample(TypedDict, total=False):
    """One scene, model-ready, before batching: what ``dataset.refer_seg.ReferSegDataset.__getitem__`` returns
    (and the step benchmark's ``training.experiments.bench_inputs`` makes), and ``dataset.collate
    .collate_batch`` stacks into a :class:`Batch`. A plain ``dict`` at run time; documented once, here.

    The image keys are :class:`Batch`'s without the leading B (``clip_center`` (3, S, S), ``sam_views``
    (V, 3, T, T), ``clip_scale`` a float, ``sam_resized_hw`` / ``original_hw`` (h, w) tuples); with a
    feature cache the encodings (``image_tokens`` (T, D), ``depth_tokens``, ``sam_embeddings`` (C, g, g))
    replace the pixels. A key that a model configuration does not use is None or absent.
    """

    clip_center: Tensor  # (3, S, S) uint8
    clip_views: Tensor | None  # (V, 3, S, S) uint8 (CAAM on CLIP)
    clip_disparity: Tensor | None  # (S, S) float32 px (depth tokens / CAAM)
    clip_scale: float  # CLIP pixels per original pixel
    sam_center: Tensor  # (3, T, T) uint8
    sam_views: Tensor | None  # (V, 3, T, T) uint8 (CAAM on SAM)
    sam_disparity: Tensor | None  # (T, T) float32 px (CAAM on SAM, depth stream)
    sam_scale: float  # SAM pixels per original pixel
    sam_resized_hw: tuple[int, int]  # the resized (unpadded) image inside T x T
    original_hw: tuple[int, int]  # (H, W)
    image_tokens: Tensor  # (T, D) from the feature cache
    depth_tokens: Tensor  # (T, D) from the feature cache
    sam_embeddings: Tensor  # (C, g, g) from the feature cache
    sam_depth: Tensor  # (2, 4g, 4g) from the feature cache (depth stream on)
    vision_features: Tensor  # (Pd, Dv) from the feature cache (light mask head)
    conversations: list[tuple[list[int], list[int]]]  # k x (input_ids, labels) (or one packed conversation)
    region_pixels: Tensor | None  # (r, 3, S_t, S_t) uint8, r ILVC answers (Batch's keys, per scene)
    region_masks: Tensor | None  # (r, S_t, S_t) bool
    region_boxes: Tensor | None  # (r, 4) float32 (--ilvc_crop caam)
    region_conv: Tensor | None  # (r,) int64 index into this sample's conversations
    # masks: one per [SEG] slot (an ILVC answer's mask twice); 255 = left out of loss and IoU
    masks: Tensor | None  # (k, H, W) uint8 {0, 1, 255}; None when predicting
    task: str  # the task of LISA's mix that made the sample (refer_seg outside a mix)
    image_id: int | str
    ds: str
    sentences: list[str]  # k expressions
    subsets: list[tuple[str, ...]]  # k subset-tag tuples
    no_target: list[bool]  # k flags: the expression names no object (GRES)
    scene_dir: str
    center_path: str


#: The image tensors stacked over scenes (present in every sample of a batch or in none).
STACKED_KEYS: tuple[str, ...] = (
    "clip_center",
    "clip_views",
    "clip_disparity",
    "sam_center",
    "sam_views",
    "sam_disparity",
    "image_tokens",
    "depth_tokens",
    "sam_embeddings",
    "sam_depth",
    "vision_features",
)
#: The keys a feature cache holds per scene (the frozen front end's outputs).
FEATURE_KEYS: tuple[str, ...] = (
    "image_tokens",
    "depth_tokens",
    "sam_embeddings",
    "sam_depth",
    "vision_features",
)
#: The ILVC region tensors concatenated over scenes (besides ``region_conv``), present when a sample has them.
REGION_KEYS: tuple[str, ...] = ("region_pixels", "region_masks", "region_boxes")
#: The per-scene metadata lists carried through unchanged.
META_KEYS: tuple[str, ...] = (
    "image_id",
    "ds",
    "sentences",
    "subsets",
    "no_target",
    "task",
    "scene_dir",
    "center_path",
)
