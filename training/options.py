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
from dataset.regions import ILVC_CROPS
from dataset.tasks.base import TASKS
from utils.options import at_least, fraction, option, positive_finite

PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
EVAL_PROTOCOLS: tuple[str, ...] = ("teacher_forced", "generated")
CACHE_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def _tasks(value: str) -> str | None:
    names = [t.strip() for t in value.split("||")]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        return f"unknown task(s) {unknown or [value]}: expected '||'-joined names of {', '.join(TASKS)}"
    if len(set(names)) < len(names):
        return "a task is named twice"
    return None


def _explanatory(value: float) -> str | None:
    if value == -1 or 0 <= value <= 1:
        return None
    return "must be a share in [0, 1], or -1 (no explanations)"


def _rates(text: str, flag: str) -> list[float]:
    """``"3,1"`` -> ``[3.0, 1.0]``; ``ValueError`` naming ``flag`` unless every value is a positive number."""
    try:
        rates = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected numbers like '3,1'") from None
    if not all(r > 0 and r == r and r != float("inf") for r in rates):
        raise ValueError(f"{flag} {text!r}: every rate must be a positive number")
    return rates


def _share(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be a share in [0, 1] (0: off)"


def _val_parts(value: str) -> str | None:
    parts = value.split("|")
    if len(parts) in (2, 3) and all(parts):
        return None
    return "expected 'ds|splitBy|split' (referring) or 'name|split' (reasoning, e.g. 'ReasonSeg|val')"


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

    dataset_dir: str = option(
        "./dataset", "root of refer_seg/, lf/ and the other tasks' folders", resume=True
    )
    dataset: str = option(
        "refer_seg",
        "'||'-joined tasks of LISA's mix: sem_seg, refer_seg, vqa, reason_seg (e.g. 'sem_seg||refer_seg||vqa||"
        "reason_seg')",
        check=_tasks,
        resume=True,
    )
    sample_rates: str = option(
        "1",
        "one task in --dataset: weight of each of its datasets (e.g. '3,1' for two --refer_seg_data); several "
        "tasks: weight of each task (LISA: '9,3,3,1')",
        resume=True,
    )
    refer_seg_data: str = option("ref-urbanlf-syn", "'||'-separated dataset names", resume=True)
    refer_seg_sample_rates: str = option(
        "",
        "weight of each --refer_seg_data dataset when --dataset names several tasks (empty: equal)",
        resume=True,
    )
    sem_seg_data: str = option(
        "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
        "'||'-separated semantic-segmentation datasets (a light-field dataset name: its categories)",
        resume=True,
    )
    vqa_data: str = option(
        "llava_instruct_150k",
        "llava_dataset/<name>.json of the VQA task (a light-field dataset name too)",
        resume=True,
    )
    reason_seg_data: str = option(
        "ReasonSeg|train",
        "'name|split' of the reasoning-segmentation task (reason_seg/<name>/<split>/)",
        resume=True,
    )
    explanatory: float = option(
        0.1,
        "reason_seg answers of images with an explanation: this share answers with the explanation alone (no "
        "mask), the rest [SEG] with or without it; -1: no explanations",
        check=_explanatory,
        resume=True,
    )
    ilvc: float = option(
        0.0,
        "share of the one-target referring answers written in LIRA's ILVC form, '[SEG] <region> description "
        "[SEG]' (the region's own visual tokens, its description from attributes.json; both [SEG]s trained on "
        "its mask); 0: off",
        check=_share,
        resume=True,
    )
    ilvc_crop: str = option(
        "centre",
        "where an ILVC region's crop comes from: the centre view at its original size, or the CAAM-aggregated "
        "view the encoders see (CLIP geometry; not with --feature_cache)",
        choices=ILVC_CROPS,
        resume=True,
    )
    disparity_set: tuple[str, ...] = option(
        (),
        "estimator setting (a DisparityConfig field, e.g. d_max=3 or views=full); repeatable",
        repeat=True,
        metavar="KEY=VALUE",
    )
    disparity_device: str = option("", "device of the estimator; empty: the rank's own device")

    @property
    def tasks(self) -> list[str]:
        """The tasks of ``--dataset``, in its order."""
        return [t.strip() for t in self.dataset.split("||")]

    @property
    def names(self) -> list[str]:
        """The datasets of ``refer_seg_data``."""
        return [n for n in self.refer_seg_data.split("||") if n.strip()]

    def task_data(self, task: str) -> str:
        """The datasets flag value of ``task`` (``--sem_seg_data``, ``--refer_seg_data``, …)."""
        return str(getattr(self, f"{task}_data"))

    def task_names(self, task: str) -> list[str]:
        """The datasets of ``task``'s flag (``--sem_seg_data`` …), ``||``-separated; ``reason_seg``'s entries
        are ``name|split``."""
        return [n.strip() for n in self.task_data(task).split("||") if n.strip()]

    def sample_weights(self) -> list[float]:
        """One positive weight per ``--refer_seg_data`` dataset (see :meth:`dataset_weights`)."""
        return self.dataset_weights("refer_seg")

    def dataset_weights(self, task: str) -> list[float]:
        """One positive weight per dataset of ``task``: ``--sample_rates`` when ``--dataset`` is that task
        alone (a single value applies to all), else ``--refer_seg_sample_rates`` for ``refer_seg`` and equal
        weights for the other tasks (LISA draws their datasets uniformly).

        Raises ``ValueError`` naming the flag; with several tasks, also when ``--sample_rates`` does not give
        one rate per task (and says which flag weights the referring datasets)."""
        self.task_weights()
        names, several = self.task_names(task), len(self.tasks) > 1
        if task == "refer_seg" and (several or self.refer_seg_sample_rates):
            if not several and str(self.sample_rates) != "1":
                raise ValueError(
                    f"--sample_rates {self.sample_rates!r} and --refer_seg_sample_rates "
                    f"{self.refer_seg_sample_rates!r} both weight --refer_seg_data when --dataset is one task: "
                    "give one of them"
                )
            flag, text = "--refer_seg_sample_rates", self.refer_seg_sample_rates or "1"
        elif several:
            flag, text = "", "1"
        else:
            flag, text = "--sample_rates", str(self.sample_rates)
        rates = _rates(text, flag)
        if len(rates) == 1:
            rates = rates * len(names)
        if len(rates) != len(names):
            raise ValueError(
                f"{flag} {text!r}: {len(rates)} rates for {len(names)} datasets of --{task}_data "
                f"{self.task_data(task)!r}"
            )
        return rates

    def task_weights(self) -> list[float]:
        """One positive weight per task of ``--dataset`` (``--sample_rates`` with several tasks; ``[1.0]``
        for one). Raises ``ValueError`` naming the flags when the count disagrees."""
        tasks = self.tasks
        if len(tasks) == 1:
            return [1.0]
        rates = _rates(str(self.sample_rates), "--sample_rates")
        if len(rates) == 1:
            return rates * len(tasks)
        if len(rates) != len(tasks):
            hint = ""
            if len(rates) == len(self.names) and "refer_seg" in tasks:
                hint = (
                    f"; to weight the {len(self.names)} datasets of --refer_seg_data use --refer_seg_sample_rates "
                    f"{self.sample_rates!r}"
                )
            raise ValueError(
                f"--sample_rates {self.sample_rates!r}: {len(rates)} rates for the {len(tasks)} tasks of --dataset "
                f"{self.dataset!r} (with several tasks --sample_rates weights the tasks){hint}"
            )
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
        "ref-urbanlf-syn|syn|val",
        "ds|splitBy|split (referring; split may be a subset tag), or name|split (reasoning segmentation: "
        "'ReasonSeg|val', or a light-field dataset's generated queries: 'ref-urbanlf-syn|val')",
        check=_val_parts,
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
    def reasoning(self) -> bool:
        """Whether ``val_dataset`` names a reasoning-segmentation set (``name|split``)."""
        return len(self.val_dataset.split("|")) == 2

    @property
    def split(self) -> tuple[str, str, str]:
        """``(ds, splitBy, split)``; a reasoning set's splitBy is empty."""
        parts = self.val_dataset.split("|")
        if len(parts) == 2:
            return parts[0], "", parts[1]
        ds, split_by, split = parts
        return ds, split_by, split
