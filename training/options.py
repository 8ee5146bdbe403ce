"""The run options of ``train_ds.py`` that belong to the loop: datasets, optimiser, loop, run and evaluation.

Each is a field declared once with :func:`utils.options.option` (default, help, choices, range check, and
``resume=True`` when a resumed run must keep it); :class:`training.config.RunConfig` composes them with the
model, trainable, data, prompt and generation options of the layers below, and derives the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dataset.disparity.config import DisparityConfig, config_overrides
from dataset.options import PROBES
from utils.options import at_least, fraction, option, positive_finite

PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
EVAL_PROTOCOLS: tuple[str, ...] = ("teacher_forced", "generated")
CACHE_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def _only_refer_seg(value: str) -> str | None:
    return None if value == "refer_seg" else "only 'refer_seg' (Ref-UrbanLF / RefCOCO layout) is supported"


def _three_parts(value: str) -> str | None:
    return None if len(value.split("|")) == 3 else "expected 'ds|splitBy|split'"


def _fresh_start(value: int) -> str | None:
    if value == 0:
        return None
    return (
        "the epoch a run continues from comes from its checkpoint (--resume / --auto_resume, with the "
        "optimiser and LR schedule); a fresh run starts at epoch 0"
    )


@dataclass(frozen=True)
class DatasetOptions:
    """Which datasets a run reads, how they are mixed, and the disparity estimator's settings."""

    dataset_dir: str = option("./dataset", "root of refer_seg/ and lf/", resume=True)
    dataset: str = option("refer_seg", "only refer_seg is supported", check=_only_refer_seg)
    sample_rates: str = option("1", "weight of each --refer_seg_data dataset, e.g. '3,1'", resume=True)
    refer_seg_data: str = option("ref-urbanlf-syn", "'||'-separated dataset names", resume=True)
    disparity_set: tuple[str, ...] = option(
        (),
        "estimator setting (a DisparityConfig field, e.g. d_max=3 or views=full); repeatable",
        repeat=True,
        metavar="KEY=VALUE",
    )
    disparity_device: str = option("", "device of the estimator; empty: the rank's own device")

    @property
    def names(self) -> list[str]:
        """The datasets of ``refer_seg_data``."""
        return [n for n in self.refer_seg_data.split("||") if n.strip()]

    def sample_weights(self) -> list[float]:
        """``sample_rates`` as one positive weight per dataset (a single value applies to all).

        Raises ``ValueError`` naming the flag."""
        names = self.names
        try:
            rates = [float(v) for v in str(self.sample_rates).split(",")]
        except ValueError:
            raise ValueError(f"--sample_rates {self.sample_rates!r}: expected numbers like '3,1'") from None
        if len(rates) == 1:
            rates = rates * len(names)
        if len(rates) != len(names):
            raise ValueError(
                f"--sample_rates {self.sample_rates!r}: {len(rates)} rates for {len(names)} datasets "
                f"of --refer_seg_data {self.refer_seg_data!r}"
            )
        if not all(r > 0 and r == r and r != float("inf") for r in rates):
            raise ValueError(f"--sample_rates {self.sample_rates!r}: every rate must be a positive number")
        return rates

    def disparity_config(self) -> DisparityConfig:
        """Estimator settings of ``--depth_source estimate``: the defaults + ``--disparity_set`` overrides.

        Raises ``ValueError`` naming a bad field or value."""
        return DisparityConfig(**config_overrides(list(self.disparity_set)))


@dataclass(frozen=True)
class OptimOptions:
    """The optimiser and its schedule (AdamW, warmup then linear decay, gradient clipping, ZeRO)."""

    lr: float = option(3e-4, "peak learning rate", check=positive_finite)
    beta1: float = option(0.9, "AdamW beta1", check=fraction)
    beta2: float = option(0.95, "AdamW beta2", check=fraction)
    warmup_steps: int = option(100, "linear warmup steps of the learning rate", check=at_least(0))
    max_grad_norm: float = option(1.0, "gradient clipping norm", check=positive_finite)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2))
    torch_adam: bool = option(False, "plain torch AdamW (no compiled op; automatic on CPU)")


@dataclass(frozen=True)
class LoopOptions:
    """The training loop: how long, how much per step, and what it draws."""

    epochs: int = option(10, "epochs", check=at_least(1))
    steps_per_epoch: int = option(500, "optimiser steps per epoch", check=at_least(1))
    batch_size: int = option(2, "scenes per micro-batch per rank", check=at_least(1), resume=True)
    grad_accumulation_steps: int = option(
        10, "micro-batches per optimiser step", check=at_least(1), resume=True
    )
    num_classes_per_sample: int = option(3, "expressions per scene per step", check=at_least(1), resume=True)
    pack_conversations: bool = option(
        False, "all expressions of a scene in one multi-turn conversation", resume=True
    )
    exprs_per_question: int = option(
        1,
        "expressions per training question: > 1 asks for several at once, answered with a [SEG]/[REJ] slot "
        "each (MLLMSeg's GRES format); validation keeps one per question",
        check=at_least(1),
        resume=True,
    )
    workers: int = option(4, "data-loader worker processes", check=at_least(0))
    gradient_checkpointing: bool = option(True, "recompute LM activations in backward")
    seed: int = option(0, "seed of the weights' fresh parts and of the sampling order", resume=True)
    print_freq: int = option(1, "log every N optimiser steps", check=at_least(1))
    save_steps: int = option(0, "also save 'last' every N optimiser steps", check=at_least(0))
    max_steps: int = option(0, "stop after N optimiser steps (0: the full run)", check=at_least(0))
    extend_schedule: bool = option(
        False,
        "resume a checkpoint although --epochs / --steps_per_epoch give the run another length: the learning "
        "rate goes on from the value it reached and falls linearly to 0 at the new end (docs/TRAINING.md)",
    )
    start_epoch: int = option(
        0, "refused unless 0: a resumed run's epoch comes from its checkpoint", check=_fresh_start
    )

    @property
    def samples_per_epoch(self) -> int:
        """Scenes one rank draws per epoch."""
        return self.steps_per_epoch * self.grad_accumulation_steps * self.batch_size


@dataclass(frozen=True)
class RunOptions:
    """What is run and where: the weights, the run folder, resuming, the feature cache."""

    version: str = option("./tiny_base/llava", "HF LLaVA dir, or a merged LFLLM dir", resume=True)
    vision_pretrained: str = option("./tiny_base/sam_tiny.pth", "SAM checkpoint (.pth)", resume=True)
    light_pretrained: str = option(
        "",
        "light head: initial weights of the light decoder (a light_decoder.safetensors, e.g. the pretrained base's "
        "or a light run's export/<tag>/); empty: fresh",
        resume=True,
    )
    vision_tower: str | None = option(
        None,
        "accepted for compatibility; the tower comes from --version",
        aliases=("vision-tower",),
        parse=str,
    )
    precision: str = option("bf16", "weights and compute dtype", choices=PRECISIONS, resume=True)
    log_base_dir: str = option("./runs", "folder of the run folders")
    exp_name: str = option("lfllm", "run folder name under --log_base_dir")
    eval_only: bool = option(False, "only evaluate --version on --val_dataset")
    resume: str = option("", "checkpoint dir (…/ckpt_model) to resume from")
    auto_resume: bool = option(True, "resume from the run's latest checkpoint when there is one")
    resume_with_changes: bool = option(
        False,
        "resume a run's checkpoint even though model/data/trainable options differ from the run's record",
    )
    feature_cache: str = option(
        "",
        "folder of the per-scene feature cache (frozen CLIP/SAM outputs computed once per scene; "
        "docs/PERFORMANCE.md); empty: off",
    )
    feature_cache_dtype: str = option(
        "auto",
        "storage dtype of the feature cache entries (auto: the training precision)",
        choices=CACHE_DTYPES,
    )
    local_rank: int = option(-1, "set by the launcher", aliases=("local-rank",))

    @property
    def run_dir(self) -> Path:
        """``<log_base_dir>/<exp_name>``."""
        return Path(self.log_base_dir) / self.exp_name


@dataclass(frozen=True)
class EvalOptions:
    """Validation: which split, how the masks are produced, where overlays go."""

    val_dataset: str = option(
        "ref-urbanlf-syn|syn|val", "ds|splitBy|split (split may be a subset tag)", check=_three_parts
    )
    val_batch_size: int = option(1, "scenes per validation batch", check=at_least(1))
    no_eval: bool = option(False, "skip validation after each epoch", off="eval")
    eval_protocol: str = option(
        "teacher_forced", "masks from the reference answer, or from generated text", choices=EVAL_PROTOCOLS
    )
    vis_save_path: str = option("", "write overlay images of validation here")
    eval_input: str = option(
        "exact",
        "what the model is shown, to measure what it reads: the light fields as on disk, each scene with the "
        "next val scene's disparity (swapped_disparity), or every neighbour view replaced by the centre view "
        "(centre_views); masks and text unchanged; not with --feature_cache",
        choices=PROBES,
    )

    @property
    def split(self) -> tuple[str, str, str]:
        """``(ds, splitBy, split)``."""
        ds, split_by, split = self.val_dataset.split("|")
        return ds, split_by, split
