"""LFLLM: transformers' LLaVA + a ``[SEG]`` token + a mask head (SAM's decoder, or the light decoder) + CAAM +
depth tokens.

Why a subclass of ``LlavaForConditionalGeneration`` rather than a wrapper around one: the subclass
inherits ``from_pretrained`` / ``save_pretrained`` (one HF directory holds LLaVA, SAM and the new modules,
and loads with no extra arguments), ``generate`` with the KV cache, gradient checkpointing, and peft's
module discovery, all unchanged. LLaVA's own ``forward`` is untouched and still serves generation; the
segmentation path is ``forward(lf_batch=...)`` (see :meth:`LFLLMForCausalLM.forward`), so the DeepSpeed
engine can call the module as usual.

Two mask routes behind one call (:meth:`LFLLMForCausalLM.predict_masks`): SAM's mask decoder prompted by the
projected ``[SEG]`` state (with the optional semantic fusion and depth stream), or the light decoder over the
tower's detail features, the image-token states and ``[SEG]`` (``--mask_head light``: no SAM is built).

Shapes used below: B images, V neighbour views, N conversations, L tokens, M ``[SEG]`` tokens,
S the CLIP input size, T the SAM input size, g = T / 16 the SAM embedding grid.

Length: about 610 lines, one ``nn.Module`` whose methods are the model's whole path (encoders, placeholders,
language model, both mask routes, the step); split over files the order of that path would be lost.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from model.caam import CAAM
from model.depth import DepthStream, depth_grid, disparity_to_depth_image
from model.light_decoder import LightDecoderConfig, LightMaskDecoder, SemanticFusion, masks_to_image
from model.losses import answer_cross_entropy, mask_losses, task_loss_sums
from model.options import CAAM_TARGETS, DEFAULT_MODEL_OPTIONS, DEPTH_PROJECTORS, MASK_HEADS
from model.regions import clip_frame_boxes, masked_normalised, sample_boxes
from model.sam import build_sam, normalise_sam_pixels, reset_sam_buffers
from utils.batch import Batch
from utils.geometry import shortest_side_shape

_OPTIONS = DEFAULT_MODEL_OPTIONS


@strict
class LFLLMConfig(LlavaConfig):
    """LLaVA config plus every LFLLM field; saved with the merged model so it reloads standalone."""

    model_type = "lfllm"

    seg_token_id: int | None = None
    rej_token_id: int | None = None
    region_token_id: int | None = None  # <region>: a model trained with ILVC answers (--ilvc)
    depth_token_id: int | None = None
    new_token_ids: list | None = None
    sam_config: dict | None = None
    # The user's options take their defaults from model.options (declared once there).
    out_dim: int = _OPTIONS.out_dim
    use_depth: bool = _OPTIONS.use_depth
    use_caam: bool = _OPTIONS.use_caam
    caam_target: str = _OPTIONS.caam_target
    caam_mode: str = _OPTIONS.caam_mode
    caam_offsets: list | None = None
    depth_range: list | tuple = _OPTIONS.depth_range
    depth_projector: str = _OPTIONS.depth_projector
    use_mm_start_end: bool = _OPTIONS.use_mm_start_end
    prompt_order: str = _OPTIONS.prompt_order
    answer_box: bool = _OPTIONS.answer_box
    semantic_fusion: bool = _OPTIONS.semantic_fusion
    depth_stream: bool = _OPTIONS.depth_stream
    depth_detail: bool = _OPTIONS.depth_detail
    mask_head: str = _OPTIONS.mask_head
    light_detail_size: int = _OPTIONS.light_detail_size
    light_dim: int = _OPTIONS.light_dim
    gres: bool = _OPTIONS.gres
    clip_image_mean: list | tuple = (0.48145466, 0.4578275, 0.40821073)
    clip_image_std: list | tuple = (0.26862954, 0.26130258, 0.27577711)
    ce_loss_weight: float = _OPTIONS.ce_loss_weight
    bce_loss_weight: float = _OPTIONS.bce_loss_weight
    dice_loss_weight: float = _OPTIONS.dice_loss_weight


AutoConfig.register("lfllm", LFLLMConfig)


def light_decoder_config(config: LFLLMConfig) -> LightDecoderConfig:
    """The light decoder's shapes for a model config: the detail grid of the tower at its detail size, the
    LLM's token grid at the tower's own size. Raises ``ValueError`` naming ``--light_detail_size``."""
    vision = config.vision_config
    size, patch = int(vision.image_size), int(vision.patch_size)
    detail = int(config.light_detail_size or size)
    if detail % size:
        raise ValueError(
            f"--light_detail_size {detail}: expected a multiple of the vision tower's input size {size} "
            "(the LLM's view is the detail view pooled by a whole factor)"
        )
    return LightDecoderConfig(
        vision_dim=int(vision.hidden_size),
        llm_dim=int(config.text_config.hidden_size),
        grid=detail // patch,
        semantic_grid=size // patch,
        dim=int(config.light_dim),
    )


def seg_predictor_positions(input_ids: torch.Tensor, seg_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the hidden state that *predicts* ``[SEG]`` sits (LISA's convention): position p with
    ``input_ids[n, p + 1] == [SEG]``. The one place this choice is made.

    ``input_ids``: (N, L) -> (rows (M,), cols (M,)), row-major order (conversation, then position).
    """
    hits = input_ids[:, 1:] == seg_token_id
    rows, cols = hits.nonzero(as_tuple=True)
    return rows, cols


def slot_predictor_positions(
    input_ids: torch.Tensor, seg_token_id: int, rej_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answer slots of a GRES model: positions p whose next token is ``[SEG]`` or ``[REJ]`` (the same
    convention as :func:`seg_predictor_positions`, which this is when ``rej_token_id`` is None).

    ``input_ids``: (N, L) -> (rows (M,), cols (M,), rejected (M,) bool: the slot holds ``[REJ]``), in
    row-major order: a conversation's slots in the order its answer writes them."""
    if rej_token_id is None:
        rows, cols = seg_predictor_positions(input_ids, seg_token_id)
        return rows, cols, torch.zeros_like(rows, dtype=torch.bool)
    nxt = input_ids[:, 1:]
    rows, cols = ((nxt == seg_token_id) | (nxt == rej_token_id)).nonzero(as_tuple=True)
    return rows, cols, nxt[rows, cols] == rej_token_id


class LFLLMForCausalLM(LlavaForConditionalGeneration):
    """LLaVA with SAM, the ``[SEG]`` projector, CAAM and the depth path (see the module docstring)."""

    config_class = LFLLMConfig
    # SAM's prompt encoder stays float32 when the rest loads in bf16/fp16 (its Fourier features fail in
    # bf16): a merged model then loads directly in its dtype, one copy in memory.
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["sam.prompt_encoder"]

    def __init__(self, config: LFLLMConfig) -> None:
        super().__init__(config)
        if config.mask_head not in MASK_HEADS:
            raise ValueError(f"mask_head {config.mask_head!r} not in {MASK_HEADS}")
        light = config.mask_head == "light"
        if config.sam_config is None and not light:
            raise ValueError("LFLLMConfig.sam_config is required (see model.sam.sam_config)")
        if config.caam_target not in CAAM_TARGETS:
            raise ValueError(f"caam_target {config.caam_target!r} not in {CAAM_TARGETS}")
        if config.depth_projector not in DEPTH_PROJECTORS:
            raise ValueError(f"depth_projector {config.depth_projector!r} not in {DEPTH_PROJECTORS}")
        hidden = config.text_config.hidden_size
        # The SAM route: SAM + the [SEG] projector into its prompt slots. The light route: neither.
        self.sam = self.seg_projector = self.light_decoder = None
        if light:
            self.light_decoder = LightMaskDecoder(light_decoder_config(config))
        else:
            self.sam = build_sam(config.sam_config)
            self.seg_projector = nn.Sequential(
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.out_dim)
            )
        self.caam = None
        if config.use_caam:
            offsets = [tuple(o) for o in (config.caam_offsets or [])]
            with torch.device("cpu"):  # CAAM builds small index tensors; keep them off the meta device
                self.caam = CAAM(offsets=offsets, mode=config.caam_mode)
        self.depth_projector = None
        if config.use_depth and config.depth_projector == "separate":
            self.depth_projector = LlavaMultiModalProjector(config)
        self.semantic_fusion = None
        if config.semantic_fusion:
            self.semantic_fusion = SemanticFusion(hidden, config.out_dim)
        self.depth_stream = None
        self._upscale_term: torch.Tensor | None = None  # what the hook below adds during one decoder call
        if config.depth_stream:
            detail = getattr(config, "depth_detail", False)
            upscaled = self.sam.mask_decoder.transformer_dim // 8  # SAM's upscaled mask embedding channels
            self.depth_stream = DepthStream(config.out_dim, upscaled if detail else 0)
            if detail:
                self.sam.mask_decoder.output_upscaling.register_forward_hook(self._add_upscale_term)
        self.post_init()

    def _add_upscale_term(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on SAM's ``output_upscaling``: adds the depth stream's detail term (1, C/8, 4g, 4g) of the
        image being decoded (``--depth_detail``) to its upscaled embedding (k, C/8, 4g, 4g); outside a
        :meth:`decode_masks_scored` call it adds nothing. SAM's own decoder runs unchanged around it."""
        term = self._upscale_term
        return output if term is None else output + term.to(output.dtype)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation, except layers marked ``zero_init`` (the semantic fusion's output:
        an untrained fusion or depth stream must leave the SAM route unchanged), and the light decoder's
        learned positions (a bare Parameter transformers does not know)."""
        super()._init_weights(module)
        if isinstance(module, LightMaskDecoder):  # its learned positions are a bare Parameter
            nn.init.normal_(module.pos, std=0.02)
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then restore SAM's non-persistent buffers (the meta-device
        construction leaves them uninitialised)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.sam is not None:
            reset_sam_buffers(model.sam)
        return loaded

    # ------------------------------------------------------------------ visual encoders
    def caam_on(self, target: str) -> bool:
        """Whether CAAM aggregates the views fed to ``target`` (``clip`` or ``sam``)."""
        return self.caam is not None and self.config.caam_target in (target, "both")

    def _aggregate(
        self,
        center: torch.Tensor,
        views: torch.Tensor | None,
        disparity: torch.Tensor | None,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Centre view (B,3,H,W) uint8 -> float [0,1], CAAM-aggregated with the views when given."""
        x = center.float() / 255.0
        if views is None:
            return x
        if disparity is None:
            raise ValueError("CAAM needs a disparity map; the batch has none")
        disp = disparity.float() * scale.float().view(-1, 1, 1)
        return self.caam(x, views.float() / 255.0, disp)

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP tower on (K,3,S,S) normalised pixels -> selected patch features (K, T, Dv); at a size other
        than the tower's own (the light head's detail pass) its position embeddings are interpolated."""
        tower = self.model.vision_tower
        resize = pixels.shape[-1] != self.config.vision_config.image_size
        out = tower(
            pixels.to(tower.dtype),
            output_hidden_states=True,
            return_dict=True,
            interpolate_pos_encoding=resize,
        )
        feats = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats

    @property
    def detail_size(self) -> int:
        """The light head's detail-pass input size (the CLIP-geometry size of its batches); the tower's own
        size for the SAM route."""
        return int(self.config.light_detail_size or self.config.vision_config.image_size)

    def encode_clip(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image tokens (B, T, D) and depth tokens (B, T, D) or None; the tower runs once on 2B images."""
        image_tokens, depth_tokens, _ = self.encode_vision(batch)
        return image_tokens, depth_tokens

    def encode_vision(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Image tokens (B, T, D), depth tokens (B, T, D) or None, and the light head's detail features
        (B, Pd, Dv) (the tower's patch features before the projector; None in the SAM route).

        The batch's CLIP-geometry images are at :attr:`detail_size`; the LLM's view is that image
        area-pooled to the tower's size (the same crop window), so one CAAM aggregation serves both."""
        clip_views = batch.get("clip_views") if self.caam_on("clip") else None
        x = self._aggregate(
            batch["clip_center"], clip_views, batch.get("clip_disparity"), batch["clip_scale"]
        )
        mean = x.new_tensor(self.config.clip_image_mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.config.clip_image_std).view(1, 3, 1, 1)
        factor = x.shape[-1] // self.config.vision_config.image_size
        pool = (lambda t: nn.functional.avg_pool2d(t, factor)) if factor > 1 else (lambda t: t)
        pixels = [(pool(x) - mean) / std]
        if self.config.use_depth:
            depth = disparity_to_depth_image(batch["clip_disparity"].float(), tuple(self.config.depth_range))
            pixels.append((pool(depth) - mean) / std)
        trainable_input = x.requires_grad
        b = x.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable_input):
            feats = self._vision_features(torch.cat(pixels))
            detail = None
            if self.light_decoder is not None:
                detail = self._vision_features((x - mean) / std) if factor > 1 else feats[:b]
        image_tokens = self.model.multi_modal_projector(feats[:b])
        if not self.config.use_depth:
            return image_tokens, None, detail
        projector = self.depth_projector or self.model.multi_modal_projector
        return image_tokens, projector(feats[b:]), detail

    def encode_regions(self, batch: Batch) -> torch.Tensor | None:
        """Visual tokens (R, T, D) of the batch's ILVC regions, or None when it has none: each region's masked
        crop (``model/regions.py``) through the tower and projector of the image tokens, in one call. The crop
        is ``region_pixels``, or with ``region_boxes`` (``--ilvc_crop caam``) sampled from the CAAM-aggregated
        CLIP view of the region's image."""
        masks = batch.get("region_masks")
        if masks is None or not len(masks):
            return None
        size = int(self.config.vision_config.image_size)
        if "region_boxes" in batch:
            if not self.caam_on("clip") or "clip_center" not in batch:
                raise ValueError(
                    "--ilvc_crop caam crops the CAAM-aggregated CLIP view: the model needs CAAM on CLIP "
                    "(--caam_target clip or both) and the batch the views (not with --feature_cache)"
                )
            x = self._aggregate(
                batch["clip_center"],
                batch.get("clip_views"),
                batch.get("clip_disparity"),
                batch["clip_scale"],
            )
            image = batch["conv_image"][batch["region_conv"]]
            hw = [batch["original_hw"][i] for i in image.tolist()]
            boxes = clip_frame_boxes(batch["region_boxes"], hw, x.shape[-1])
            pixels, inside = sample_boxes(x[image], boxes, size)
            masks = masks.bool() & inside
        else:
            pixels = batch["region_pixels"].float() / 255.0
        pixels = masked_normalised(pixels, masks, self.config.clip_image_mean, self.config.clip_image_std)
        with torch.set_grad_enabled(torch.is_grad_enabled() and pixels.requires_grad):
            feats = self._vision_features(pixels)
        return self.model.multi_modal_projector(feats)

    def encode_sam(self, batch: Batch) -> torch.Tensor:
        """SAM image embeddings (B, C, g, g), one encoder pass per image."""
        sam_views = batch.get("sam_views") if self.caam_on("sam") else None
        x = self._aggregate(batch["sam_center"], sam_views, batch.get("sam_disparity"), batch["sam_scale"])
        x = normalise_sam_pixels(x * 255.0, batch["sam_resized_hw"])
        encoder = self.sam.image_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return encoder(x.to(encoder.patch_embed.proj.weight.dtype))

    def encode_frozen(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(image tokens (B, T, D), depth tokens (B, T, D) or None, the mask head's image features): SAM
        embeddings (B, C, g, g) in the SAM route, the detail features (B, Pd, Dv) in the light route. The
        outputs of the frozen front end, taken from the batch when a feature cache put them there
        (``image_tokens`` / ``depth_tokens`` / ``sam_embeddings`` or ``vision_features``), else computed."""
        visual_key = "sam_embeddings" if self.sam is not None else "vision_features"
        if "image_tokens" in batch:
            if visual_key not in batch:
                raise ValueError(f"the cached batch has no {visual_key} for this model's mask head")
            image_tokens = batch["image_tokens"]
            depth_tokens = batch.get("depth_tokens") if self.config.use_depth else None
            return image_tokens, depth_tokens, batch[visual_key]
        image_tokens, depth_tokens, detail = self.encode_vision(batch)
        return image_tokens, depth_tokens, detail if self.sam is None else self.encode_sam(batch)

    def sam_depth(self, batch: Batch) -> torch.Tensor | None:
        """The depth stream's input (B, 2, 4g, 4g) (:func:`model.depth.depth_grid`): from a feature cache
        (``sam_depth``) or from the batch's SAM-geometry disparity; None without ``--depth_stream``."""
        if self.depth_stream is None:
            return None
        if "sam_depth" in batch:
            return batch["sam_depth"]
        disparity = batch.get("sam_disparity")
        if disparity is None:
            raise ValueError("--depth_stream needs the scene's disparity at SAM geometry; the batch has none")
        grid = int(self.sam.prompt_encoder.image_embedding_size[0])
        return depth_grid(disparity, batch["sam_resized_hw"], grid, tuple(self.config.depth_range))

    # ------------------------------------------------------------------ language model
    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        conv_image: torch.Tensor,
        image_tokens: torch.Tensor,
        depth_tokens: torch.Tensor | None,
        region_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (N, L, D) with image/depth features written at their placeholder runs.

        ``conv_image`` (N,) gives each conversation's image; features are indexed, never re-encoded.
        ``region_tokens`` (R, T, D): the ILVC regions' tokens (:meth:`encode_regions`), written at the
        ``<region>`` runs in row-major order (conversation, then position).
        """
        embeds = self.get_input_embeddings()(input_ids)
        pairs = [(self.config.image_token_id, image_tokens)]
        if depth_tokens is not None:
            pairs.append((self.config.depth_token_id, depth_tokens))
        for token_id, feats in pairs:
            mask = input_ids == token_id
            per_conv = feats[conv_image]
            counts = mask.sum(1)
            if bool((counts != per_conv.shape[1]).any()):
                raise ValueError(
                    f"placeholder token {token_id}: conversations hold {counts.tolist()} tokens but each "
                    f"image has {per_conv.shape[1]} features (expand placeholders before the forward)"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), per_conv.to(embeds.dtype))
        if self.config.region_token_id is not None:
            mask = input_ids == self.config.region_token_id
            have = 0 if region_tokens is None else region_tokens.shape[0] * region_tokens.shape[1]
            if int(mask.sum()) != have:
                raise ValueError(
                    f"<region> placeholders: the conversations hold {int(mask.sum())} tokens but the batch's "
                    f"regions give {have} features"
                )
            if have:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), region_tokens.to(embeds.dtype))
        return embeds

    def language_hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (N, L, D) of the language model."""
        out = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    # ------------------------------------------------------------------ masks
    def conversation_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The LLM's states at each conversation's image-token positions, then its ``<DEPTH>`` positions:
        (N, T, D), what the semantic fusion reads; None without it."""
        if self.semantic_fusion is None:
            return None
        ids = [self.config.image_token_id]
        if self.config.use_depth and self.config.depth_token_id is not None:
            ids.append(self.config.depth_token_id)
        n, d = input_ids.shape[0], hidden.shape[-1]
        return torch.cat([hidden[input_ids == token_id].view(n, -1, d) for token_id in ids], dim=1)

    def decode_masks(
        self,
        seg_embeddings: torch.Tensor,
        seg_image: torch.Tensor,
        image_embeddings: torch.Tensor,
        resized_hw: torch.Tensor,
        original_hw: list[tuple[int, int]],
        states: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """SAM mask decoder prompted with projected ``[SEG]`` states (masks of :meth:`decode_masks_scored`).

        Returns, per image, mask logits (k_i, H_i, W_i) at original resolution, in ``[SEG]`` order.
        """
        out = self.decode_masks_scored(
            seg_embeddings, seg_image, image_embeddings, resized_hw, original_hw, states, depth
        )
        return out[0]

    def decode_masks_scored(
        self,
        seg_embeddings: torch.Tensor,
        seg_image: torch.Tensor,
        image_embeddings: torch.Tensor,
        resized_hw: torch.Tensor,
        original_hw: list[tuple[int, int]],
        states: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """SAM mask decoder prompted with projected ``[SEG]`` states, with SAM's own quality estimate.

        ``seg_embeddings`` (M, C); ``seg_image`` (M,) image index of each; ``image_embeddings`` (B, C, g, g);
        ``states`` (M, T, D): the LLM states of each ``[SEG]``'s conversation (:meth:`conversation_states`),
        read by the semantic fusion into the decoder's dense prompt (``--semantic_fusion``); ``depth``
        (B, 2, 4g, 4g): each image's depth grid (:meth:`sam_depth`), encoded by the depth stream into the
        dense prompt and the fusion's queries (``--depth_stream``), and with ``--depth_detail`` into the decoder's
        upscaled mask embedding at 4g x 4g (:meth:`_add_upscale_term`).
        Returns, per image, mask logits (k_i, H_i, W_i) at original resolution and SAM's predicted IoU
        (k_i,) float32 of each mask (the decoder's IoU head), both in ``[SEG]`` order.
        """
        decoder = self.sam.mask_decoder
        dtype = image_embeddings.dtype
        pe = self.sam.prompt_encoder.get_dense_pe().to(dtype)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight.to(dtype).view(1, -1, 1, 1)
        g = image_embeddings.shape[-2:]
        depth_dense = depth_detail = None
        if depth is not None and self.depth_stream is not None:
            depth_dense = self.depth_stream(depth).to(dtype)  # (B, C, g, g)
            depth_detail = self.depth_stream.detail(depth)  # (B, C/8, 4g, 4g) with --depth_detail, else None
        masks_out, ious_out = [], []
        for i in range(image_embeddings.shape[0]):
            sel = (seg_image == i).nonzero(as_tuple=True)[0]
            height, width = (int(v) for v in original_hw[i])
            if len(sel) == 0:  # SAM's decoder cannot run on zero prompts (a generated answer without [SEG])
                masks_out.append(image_embeddings.new_zeros((0, height, width), dtype=torch.float32))
                ious_out.append(image_embeddings.new_zeros((0,), dtype=torch.float32))
                continue
            sparse = seg_embeddings[sel].to(dtype).unsqueeze(1)
            dense = no_mask.expand(sparse.shape[0], -1, *g)
            embedding = image_embeddings[i : i + 1]
            if depth_dense is not None:
                dense = dense + depth_dense[i : i + 1]
                embedding = embedding + depth_dense[i : i + 1]
            if states is not None and self.semantic_fusion is not None:
                dense = dense + self.semantic_fusion(embedding.expand(len(sel), -1, -1, -1), pe, states[sel])
            self._upscale_term = None if depth_detail is None else depth_detail[i : i + 1]
            try:
                low_res, iou_pred = decoder(
                    image_embeddings=image_embeddings[i : i + 1],
                    image_pe=pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            finally:
                self._upscale_term = None
            h, w = (int(v) for v in resized_hw[i])
            masks = self.sam.postprocess_masks(low_res.float(), (h, w), tuple(original_hw[i]))
            masks_out.append(masks[:, 0])
            ious_out.append(iou_pred[:, 0].float())
        return masks_out, ious_out

    def predict_masks(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        conv_image: torch.Tensor,
        visual: torch.Tensor,
        batch: Batch,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Masks of the ``[SEG]`` predictors at (``rows``, ``cols``) of ``hidden`` (N, L, D), by this model's
        mask head; ``visual`` is :meth:`encode_frozen`'s third output. Returns, per image, mask logits
        (k_i, H_i, W_i) at original resolution and a score (k_i,) of each, in ``[SEG]`` order (row-major):
        SAM's predicted IoU, or for the light head its mean probability inside the mask (0 when empty)."""
        seg_image = conv_image[rows]
        if self.light_decoder is None:
            states = self.conversation_states(hidden, input_ids)
            return self.decode_masks_scored(
                self.seg_projector(hidden[rows, cols]),
                seg_image,
                visual,
                batch["sam_resized_hw"],
                batch["original_hw"],
                None if states is None else states[rows],
                self.sam_depth(batch),
            )
        n, d = input_ids.shape[0], hidden.shape[-1]
        semantic = hidden[input_ids == self.config.image_token_id].view(n, -1, d)
        masks_out, scores_out = [], []
        if len(rows):
            logits = self.light_decoder(visual, semantic, hidden[rows, cols], rows, conv_image)
        size = self.detail_size
        for i, (height, width) in enumerate(batch["original_hw"]):
            sel = (seg_image == i).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                masks_out.append(hidden.new_zeros((0, int(height), int(width)), dtype=torch.float32))
                scores_out.append(hidden.new_zeros((0,), dtype=torch.float32))
                continue
            hw = (int(height), int(width))
            masks = masks_to_image(logits[sel], size, hw, shortest_side_shape(*hw, size))
            prob = masks.detach().sigmoid()
            inside = (masks.detach() > 0).float()
            scores_out.append((prob * inside).sum((1, 2)) / inside.sum((1, 2)).clamp_min(1.0))
            masks_out.append(masks)
        return masks_out, scores_out

    # ------------------------------------------------------------------ full step
    def forward(self, *args, lf_batch: Batch | None = None, **kwargs):
        """``forward(lf_batch=batch)`` runs the segmentation step (see :meth:`forward_lf`); any other
        call is LLaVA's own forward (used by ``generate``)."""
        if lf_batch is None:
            return super().forward(*args, **kwargs)
        return self.forward_lf(lf_batch)

    def forward_lf(self, batch: Batch) -> dict:
        """One segmentation step on a collated batch (``dataset.collate.collate_batch``).

        Returns ``loss``, ``ce_loss``, ``bce_loss``, ``dice_loss`` (scalars), ``pred_masks`` (list per
        image of (k_i, H_i, W_i) logits at original resolution, in the order of ``batch["gt_masks"]``) and
        ``pred_ious`` (list per image of (k_i,) SAM-predicted IoUs, detached; no loss trains them); with
        ``batch["task_names"]`` (a task mix) also ``task_stats`` (T, 5), :func:`model.losses.task_loss_sums`.
        An ILVC answer's ``<region>`` run holds its region's tokens (:meth:`encode_regions`, per step); its two
        ``[SEG]`` slots each decode a mask, both trained on the target (``gt_masks`` holds it once per slot).
        """
        image_tokens, depth_tokens, visual = self.encode_frozen(batch)
        input_ids, conv_image = batch["input_ids"], batch["conv_image"]
        regions = self.encode_regions(batch)  # ILVC answers (--ilvc): per expression, never cached
        embeds = self.build_inputs_embeds(input_ids, conv_image, image_tokens, depth_tokens, regions)
        hidden = self.language_hidden(embeds, batch["attention_mask"])
        rej_id = self.config.rej_token_id
        rows, cols, slot_rej = slot_predictor_positions(input_ids, self.config.seg_token_id, rej_id)
        seg_image = conv_image[rows]
        expected = torch.tensor([len(m) for m in batch["gt_masks"]], device=seg_image.device)
        found = torch.bincount(seg_image, minlength=len(expected))
        if not torch.equal(found, expected):
            what = "[SEG]/[REJ] slots" if rej_id is not None else "[SEG] tokens"
            raise ValueError(f"{what} per image {found.tolist()} != masks per image {expected.tolist()}")
        pred_masks, pred_ious = self.predict_masks(hidden, input_ids, rows, cols, conv_image, visual, batch)
        result = {"pred_masks": pred_masks, "pred_ious": [iou.detach() for iou in pred_ious]}
        # The model's own decision at each slot (teacher-forced): [REJ] scored above [SEG] by its LM head.
        if rej_id is not None and len(rows):
            slot_logits = self.lm_head(hidden[rows, cols].detach())[:, [self.config.seg_token_id, rej_id]]
            decided = slot_logits[:, 1] > slot_logits[:, 0]
        else:
            decided = torch.zeros_like(rows, dtype=torch.bool)
        per_image = [(seg_image == i).nonzero(as_tuple=True)[0] for i in range(len(expected))]
        result["pred_rejected"] = [decided[sel] for sel in per_image]
        labels = batch.get("labels")
        ce = (
            answer_cross_entropy(hidden, labels, self.lm_head) if labels is not None else hidden.new_zeros(())
        )
        # The mask losses train the [SEG] slots only: a [REJ] slot's answer is the token (GSVA, MLLMSeg).
        keep = [~slot_rej[sel] for sel in per_image]
        trained = [m[k] for m, k in zip(pred_masks, keep)]
        targets = [g[k.to(g.device)] for g, k in zip(batch["gt_masks"], keep)]
        bce, dice = mask_losses(trained, targets)
        if batch.get("task_names") and labels is not None:  # a task mix: each task's losses, for the log
            result["task_stats"] = task_loss_sums(
                hidden, labels, self.lm_head, conv_image, trained, targets, batch["task"], batch["task_names"]
            )
        cfg = self.config
        loss = cfg.ce_loss_weight * ce + cfg.bce_loss_weight * bce + cfg.dice_loss_weight * dice
        if not len(rows) and torch.is_grad_enabled():
            # No mask anywhere in the batch (a VQA or explanation-only batch of the task mix). DeepSpeed's ranks
            # reduce gradients in the order backward produces them, so every rank's graph must have the same
            # shape: the mask head runs once on the first conversation's last state, weighted by zero.
            last = (batch["attention_mask"][0].sum() - 1).view(1)
            dummy, _ = self.predict_masks(
                hidden, input_ids, last.new_zeros(1), last, conv_image, visual, batch
            )
            loss = loss + sum(m.float().sum() for m in dummy) * 0.0
        result.update(
            loss=loss,
            ce_loss=ce.detach(),
            bce_loss=bce.detach(),
            dice_loss=dice.detach(),
        )
        return result


def _register() -> None:
    """Auto-class registration, and LLaVA's checkpoint key mapping for our model type (so HF LLaVA
    directories saved in either the old or the new key layout load into LFLLM)."""
    from transformers import AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    AutoModelForImageTextToText.register(LFLLMConfig, LFLLMForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(
        "lfllm", get_checkpoint_conversion_mapping("llava"), overwrite=True
    )


_register()
