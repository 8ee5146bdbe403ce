"""The run configuration: every option of ``train_ds.py`` as a typed field, composed into one :class:`RunConfig`.

Each option is a dataclass field declared once with :func:`utils.options.option` — its default, help,
choices, parser, range check and whether a resumed run must keep it — in the dataclass of the layer that
uses it: the model, trainable set, scene layout and prompt options below ``training/`` (``model/``,
``dataset/``), the datasets, optimiser, loop, run and evaluation options in ``training/options.py``.
:func:`build_parser` derives the flags from the fields (the reference LISA/LFLLM flags keep their names and
defaults, so an existing command line runs; switches work both ways, ``--x`` / ``--no_x``), and :func:`parse_config` is what an entry point calls:
it parses once and returns the :class:`RunConfig` that the library reads. Below the entry points nothing
sees the parser's namespace; :func:`parse_args` (the namespace) is kept for the flag-level tests.

The run record (``args.json``, ``run_options.json``, the ``trainable.json`` beside exported weights) is
:meth:`RunConfig.to_record`; merge, resume and ``--eval_only`` read it back with
:meth:`RunConfig.from_record`, which also reads the flat records of earlier versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dataset.disparity.config import DisparityConfig
from dataset.options import DataOptions, PromptOptions
from model.options import GenerationOptions, ModelOptions
from model.trainable import TrainableOptions
from training.options import (
    CACHE_DTYPES,
    EVAL_PROTOCOLS,
    PRECISIONS,
    DatasetOptions,
    EvalOptions,
    LoopOptions,
    OptimOptions,
    RunOptions,
)
from utils.options import (
    add_option_flags,
    explicit_dests,
    given_fields,
    is_option,
    options_from_args,
    problems,
)
from utils.views import view_set_offsets

__all__ = [
    "CACHE_DTYPES",
    "EVAL_PROTOCOLS",
    "PRECISIONS",
    "DatasetOptions",
    "EvalOptions",
    "LoopOptions",
    "OptimOptions",
    "RunConfig",
    "RunOptions",
    "build_parser",
    "config_from_namespace",
    "parse_args",
    "parse_config",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of ``train_ds.py`` is: the option groups, and the flags its command line set."""

    model: ModelOptions = field(default_factory=ModelOptions)
    trainable: TrainableOptions = field(default_factory=TrainableOptions)
    data: DataOptions = field(default_factory=DataOptions)
    datasets: DatasetOptions = field(default_factory=DatasetOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    run: RunOptions = field(default_factory=RunOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    #: Flags set on the command line (a recorded option is only checked against the weights when given).
    given: frozenset[str] = frozenset()

    #: group field -> its key in a run record (``trainable.json``'s ``model_options`` etc.).
    RECORD_KEYS: ClassVar[dict[str, str]] = {
        "model": "model_options",
        "trainable": "trainable_options",
        "data": "data_options",
        "datasets": "dataset_options",
        "prompt": "prompt_options",
        "generation": "generation_options",
        "optim": "optim_options",
        "loop": "loop_options",
        "run": "run_options",
        "eval": "eval_options",
    }

    def __post_init__(self) -> None:
        lines = self.problems()
        if lines:
            raise ValueError("; ".join(lines))

    def groups(self) -> dict[str, Any]:
        """group name -> its options (in record order)."""
        return {name: getattr(self, name) for name in self.RECORD_KEYS}

    def problems(self) -> list[str]:
        """Every out-of-range value and every inconsistent combination, one message each."""
        lines = [line for opts in self.groups().values() for line in problems(opts)]
        for check in (
            self.datasets.sample_weights,
            self._check_targets,
            self._check_estimator,
            self._check_mask_head,
            self._check_eval_input,
            self._check_tasks,
            self._check_ilvc,
        ):
            try:
                check()
            except ValueError as exc:
                lines.append(str(exc))
        return lines

    def _check_tasks(self) -> None:
        """The task mix's flags act or are refused: a reasoning val set is not served from a feature cache
        and not probed; ``--refer_seg_sample_rates`` needs referring segmentation in ``--dataset``."""
        d, ev = self.datasets, self.eval
        if d.refer_seg_sample_rates and "refer_seg" not in d.tasks:
            raise ValueError(f"--refer_seg_sample_rates: --dataset {d.dataset!r} has no refer_seg task")
        if self.run.feature_cache and not self.run.eval_only:
            for task in d.tasks:
                names = [
                    n.rpartition("|")[0] if task == "reason_seg" and "|" in n else n
                    for n in d.task_names(task)
                ]
                others = [n for n in names if n not in d.names]
                if others:
                    raise ValueError(
                        f"--feature_cache holds the scenes of --refer_seg_data {d.refer_seg_data!r}, and task {task} "
                        f"also reads {', '.join(others)} (--{task}_data): drop --feature_cache or those datasets"
                    )
        if ev.reasoning and self.run.feature_cache and (self.run.eval_only or not ev.no_eval):
            raise ValueError(
                f"--val_dataset {ev.val_dataset!r} (reasoning segmentation) is evaluated from the images: "
                "drop --feature_cache, or train with --no_eval and evaluate the merged model without it"
            )
        if ev.reasoning and ev.eval_input != "exact":
            raise ValueError(f"--eval_input {ev.eval_input}: the probes apply to referring val sets only")

    def _check_ilvc(self) -> None:
        """``--ilvc`` writes one expression's ``[SEG]`` pair per referring answer, per step."""
        d = self.datasets
        if d.ilvc <= 0:
            return
        if "refer_seg" not in d.tasks:
            raise ValueError(
                f"--ilvc {d.ilvc}: ILVC answers are referring answers; --dataset {d.dataset!r} has none"
            )
        if self.model.answer_box or self.loop.exprs_per_question > 1:
            raise ValueError(
                f"--ilvc {d.ilvc}: an ILVC answer is one expression's '[SEG] <region> description [SEG]'; not "
                "with --answer_box or --exprs_per_question > 1"
            )
        if d.ilvc_crop == "caam" and self.run.feature_cache and not self.run.eval_only:
            raise ValueError(
                "--ilvc_crop caam crops the CAAM-aggregated view, which a cached batch does not hold: use "
                "--ilvc_crop centre (read per step beside the cache) or drop --feature_cache"
            )
        if d.ilvc_crop == "caam" and (not self.model.use_caam or self.model.caam_target == "sam"):
            raise ValueError("--ilvc_crop caam: the CLIP branch sees no CAAM-aggregated view (--no_caam or "
                             "--caam_target sam); use --ilvc_crop centre")  # fmt: skip

    def _check_eval_input(self) -> None:
        probe = self.eval.eval_input
        if probe == "exact":
            return
        if not self.run.eval_only:
            raise ValueError(
                f"--eval_input {probe}: a probe of what a trained model reads, only with --eval_only"
            )
        if self.run.feature_cache:
            raise ValueError(
                f"--eval_input {probe} changes what the encoders see, which a feature cache cannot serve: "
                "drop --feature_cache"
            )

    def _check_targets(self) -> None:
        if not self.trainable.lora_target_modules.strip(","):
            raise ValueError(
                "--lora_target_modules is empty: name the language-model layers (e.g. q_proj,v_proj)"
            )

    #: The flags that only mean something with SAM (refused with ``--mask_head light``).
    SAM_FLAGS: ClassVar[tuple[str, ...]] = (
        "vision_pretrained",
        "train_mask_decoder",
        "out_dim",
        "image_size",
    )

    def _check_mask_head(self) -> None:
        if self.model.mask_head != "light":
            if self.run.light_pretrained:
                raise ValueError(
                    f"--light_pretrained {self.run.light_pretrained}: the SAM route (--mask_head sam) has no light "
                    "decoder: add --mask_head light, or drop the flag"
                )
            return
        given = sorted(set(self.SAM_FLAGS) & set(self.given))
        if given:
            flags = ", ".join(f"--{name}" for name in given)
            raise ValueError(f"{flags}: the light mask head (--mask_head light) has no SAM; drop {flags}")

    @property
    def sam_checkpoint(self) -> str | None:
        """The SAM checkpoint to build a base with: ``--vision_pretrained`` in the SAM route, None for the
        light mask head (a merged model holds its own SAM; the given flag is checked against it)."""
        return None if self.model.mask_head == "light" else self.run.vision_pretrained

    @property
    def light_checkpoint(self) -> str | None:
        """The light decoder's initial weights (``--light_pretrained``), None when fresh."""
        return self.run.light_pretrained or None

    def _check_estimator(self) -> None:
        try:
            view_set_offsets(self.datasets.disparity_config().views)
        except ValueError as exc:
            raise ValueError(f"--disparity_set: {exc}") from None

    def given_fields(self, cls: type) -> set[str]:
        """The fields of the option class ``cls`` whose flags the command line set."""
        return given_fields(cls, self.given)

    def replace(self, **groups: Any) -> RunConfig:
        """A copy with whole groups replaced, or fields of a group: ``replace(loop={"seed": 1})``."""
        values = {}
        for name, value in groups.items():
            if isinstance(value, Mapping):
                value = dataclasses.replace(getattr(self, name), **value)
            values[name] = value
        return dataclasses.replace(self, **values)

    def to_record(self) -> dict[str, Any]:
        """The configuration as written in a run's records (JSON-ready: tuples become lists)."""
        record: dict[str, Any] = {
            key: dataclasses.asdict(getattr(self, g)) for g, key in self.RECORD_KEYS.items()
        }
        record["given"] = sorted(self.given)
        return json.loads(json.dumps(record, default=str))

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, **groups: Any) -> RunConfig:
        """The configuration a record holds (:meth:`to_record`, or the flat ``args`` / ``trainable.json`` of
        earlier versions: a field found at the top level counts too); unknown keys are ignored, missing ones
        take their defaults. ``groups`` replace whole groups."""
        record = dict(record or {})
        if isinstance(record.get("config"), Mapping):  # args.json: {"config": {...}, "argv", "git"}
            record = dict(record["config"])
        if isinstance(record.get("args"), Mapping):  # args.json of earlier versions: {"args": {...}}
            record = {**record["args"], **record}
        values: dict[str, Any] = {}
        for name, key in cls.RECORD_KEYS.items():
            if name in groups:
                values[name] = groups[name]
                continue
            opts_cls = type(getattr(_DEFAULT_CONFIG, name))
            nested = record.get(key) if isinstance(record.get(key), Mapping) else {}
            kwargs = {}
            for f in dataclasses.fields(opts_cls):
                if f.name in nested:
                    kwargs[f.name] = nested[f.name]
                elif f.name in record and not isinstance(record[f.name], Mapping):
                    kwargs[f.name] = record[f.name]
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            values[name] = opts_cls(**kwargs)
        return cls(**values, given=frozenset(record.get("given") or ()))

    def with_recorded(self, record: Mapping[str, Any] | None, groups: Sequence[str]) -> RunConfig:
        """A copy whose fields of ``groups`` take the values ``record`` holds (a run record, or a merged
        model's ``merge_info.json``) unless their flag was given on the command line: what a model was
        trained with is what it is evaluated and served with (``--eval_only``, chat, the demo)."""
        if not record:
            return self
        recorded = RunConfig.from_record(record)
        values = {}
        for name in groups:
            opts = getattr(self, name)
            keep = self.given_fields(type(opts))
            changes = {
                f.name: getattr(getattr(recorded, name), f.name)
                for f in dataclasses.fields(opts)
                if is_option(f) and f.name not in keep and _in_record(record, self.RECORD_KEYS[name], f.name)
            }
            values[name] = dataclasses.replace(opts, **changes)
        return dataclasses.replace(self, **values)

    def resume_values(self) -> dict[str, Any]:
        """``group.field`` -> value for every option a resumed run must share with the run it continues."""
        out = {}
        for name, opts in self.groups().items():
            for f in dataclasses.fields(opts):
                if is_option(f) and f.metadata.get("resume"):
                    out[f"{self.RECORD_KEYS[name]}.{f.name}"] = getattr(opts, f.name)
        return json.loads(json.dumps(out, default=str))


def _in_record(record: Mapping[str, Any], key: str, name: str) -> bool:
    """Whether ``record`` holds field ``name`` (in its group ``key``, or flat as earlier records did)."""
    nested = record.get(key)
    return (isinstance(nested, Mapping) and name in nested) or name in record


_DEFAULT_CONFIG = RunConfig()

#: Title of each group's flags in ``--help``.
_HELP_GROUPS = {
    "run": "what is run and where (reference flags + ours)",
    "datasets": "datasets (reference flags)",
    "prompt": "prompt (reference flags)",
    "model": "model, light-field modules (LFLLM) and losses",
    "trainable": "trainable set (reference flags)",
    "data": "scene files and disparity source (ours)",
    "optim": "optimiser (reference flags + ours)",
    "loop": "training loop (reference flags + ours)",
    "eval": "evaluation",
    "generation": "generation (generated protocol)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``train_ds.py`` parser: one flag per option field of every group of :class:`RunConfig`."""
    parser = argparse.ArgumentParser(
        description="Train (or with --eval_only, evaluate) LFLLM for light-field referring segmentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, title in _HELP_GROUPS.items():
        add_option_flags(parser.add_argument_group(title), type(getattr(_DEFAULT_CONFIG, name)))
    return parser


def config_from_namespace(args: argparse.Namespace, given: Sequence[str]) -> RunConfig:
    """The :class:`RunConfig` of a parsed command line (flags absent from the parser keep their defaults;
    ``given``: the flags it set). Entry points with a parser of their own (chat, the demo) call it."""
    groups = {name: options_from_args(type(opts), args) for name, opts in _DEFAULT_CONFIG.groups().items()}
    return RunConfig(**groups, given=frozenset(given))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parser's namespace, validated (``SystemExit`` with a message on a bad value); ``args.given``
    lists the flags the command line set. Entry points call :func:`parse_config` instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = explicit_dests(parser, argv)
    try:
        config_from_namespace(args, args.given)
    except ValueError as exc:
        parser.error(str(exc).split("; ")[0])
    return args


def parse_config(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse the command line once into the typed :class:`RunConfig` (``SystemExit`` with a message on a
    bad value)."""
    args = parse_args(argv)
    return config_from_namespace(args, args.given)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model fields chosen on the command line (the parser's namespace)."""
    return options_from_args(ModelOptions, args)


def trainable_options(args: argparse.Namespace) -> TrainableOptions:
    """LoRA / head switches chosen on the command line (the parser's namespace)."""
    return options_from_args(TrainableOptions, args)


def disparity_config(args: argparse.Namespace) -> DisparityConfig:
    """Estimator settings of ``--depth_source estimate`` from the parser's namespace."""
    return options_from_args(DatasetOptions, args).disparity_config()
