"""AttrEval (LIRA) on light fields: what the ``[SEG]`` state knows about its target, and whether it matters.

For a merged model (``--version``), teacher-forced forward passes with the evaluation's prompts
(``ReferSegDataset(train=False)``, the loader of ``train_ds.py --eval_only``) over the train split and
the val split of ``--val_dataset`` collect, per expression, the state the mask head reads (the final-norm
last-layer state at the ``[SEG]`` predictor position, ``model.lfllm.slot_predictor_positions``), the IoU of
its mask and its target's attributes (``refer_seg/<ds>/attributes.json``, ``dataset/attributes.py``).
One linear probe per attribute (category, colour, depth bin, occlusion; :mod:`.attr_probe`) is fitted on
the train states and scored on val beside the majority-class baseline. LIRA's claim is then tested on
val: the Spearman correlation of "attributes read out correctly" (0..4 per expression) with IoU, and the
mean IoU with every attribute right vs not. Expressions naming no or several objects (GRES) are skipped.
With ``--ask``, the model is also asked about its target after its ``[SEG]`` answer
(:mod:`.attr_ask`: "What colour is it?", "What is it?"), its generated answers scored against the file.

    python scripts/attr_eval.py --version MERGED_DIR --dataset_dir DATASET \\
        --val_dataset "ref-urbanlf-syn|syn|val" --out runs/attr_eval

writes ``OUT/attr_eval.json`` (figures + every val expression) and ``OUT/attr_eval.png``; prints a table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dataset.attributes import PROBED, attributes_path, load_attributes
from dataset.collate import move_batch
from model.build import DTYPES, build_lfllm
from model.inference import teacher_forced_scored
from model.lfllm import LFLLMForCausalLM, slot_predictor_positions
from training.config import RunConfig, parse_config
from training.evaluate import check_protocol
from training.experiments.attr_ask import ask_attributes, asked_figures
from training.experiments.attr_plot import attr_plot
from training.experiments.attr_probe import iou_by_readout, probe_attributes
from training.loaders import build_val_loader
from utils.metrics import mask_iou_stats
from utils.options import add_option_flags, at_least, option, options_from_args, positive_finite, problems
from utils.visualize import write_png


@dataclass(frozen=True)
class AttrEvalOptions:
    """The probe's own options (``train_ds.py --eval_only``'s come as a :class:`RunConfig`)."""

    out: str = option("runs/attr_eval", "folder for attr_eval.{json,png}")
    train_split: str = option("train", "split (or subset tag) of --val_dataset's ds the probes are fitted on")
    scenes_per_batch: int = option(4, "scenes per teacher-forced forward pass", check=at_least(1))
    l2: float = option(
        1e-3, "L2 weight of the logistic probes (on standardised features)", check=positive_finite
    )

    ask: bool = option(
        False,
        "also ask the model after its [SEG] answer: 'What colour is it?' / 'What is it?' (generated, "
        "--max_new_tokens), scored against attributes.json",
    )

    def __post_init__(self) -> None:
        found = problems(self)
        if found:
            raise ValueError("; ".join(found))


@torch.no_grad()
def collect_states(
    model: LFLLMForCausalLM, loader: Any, device: torch.device, desc: str = "forward"
) -> list[dict[str, Any]]:
    """Every expression of ``loader`` (a :func:`training.loaders.build_val_loader` loader, in order): its
    ``[SEG]`` state ``state`` (D,) float32 CPU, ``iou`` (a slot the model rejects counts as an empty mask,
    as in ``training.evaluate``), ``ann_ids`` (its ref's targets), ``sentence``, ``image_id``.

    The state is captured by a hook on the language model during :func:`teacher_forced_scored`, so the
    forward is exactly the evaluation's; slots come in row-major order, which per image is the order of its
    expressions (``SceneDataset`` in ``val`` mode: each ref's sentences, refs in order)."""
    scenes = loader.dataset.dataset.scenes
    refs_of = {(scenes.names[sc.ds_index], sc.image_id): sc.refs for sc in scenes.scenes}
    captured: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_hook(
        lambda _m, _i, out: captured.append(out.last_hidden_state)
    )
    cfg, records = model.config, []
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, dynamic_ncols=True):
            batch = move_batch(batch, device)
            captured.clear()
            masks, _, rejected = teacher_forced_scored(model, batch)
            rows, cols, _ = slot_predictor_positions(
                batch["input_ids"], cfg.seg_token_id, getattr(cfg, "rej_token_id", None)
            )
            states = captured[-1][rows, cols].float().cpu()
            seg_image = batch["conv_image"][rows].cpu()
            for i, (pred, gt) in enumerate(zip(masks, batch["gt_masks"])):
                pred = torch.where(rejected[i].view(-1, 1, 1), torch.zeros_like(pred), pred.float())
                inter, union = mask_iou_stats(pred, gt)
                ious = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
                key = (batch["ds"][i], batch["image_id"][i])
                refs = [ref for ref in refs_of[key] for _ in ref.sentences]
                own = states[seg_image == i]
                if not len(refs) == len(own) == len(ious):
                    raise ValueError(
                        f"scene {key}: {len(refs)} expressions, {len(own)} slots, {len(ious)} masks"
                    )
                for k, ref in enumerate(refs):
                    records.append(
                        {
                            "state": own[k],
                            "iou": float(ious[k]),
                            "ann_ids": list(ref.ann_ids),
                            "sentence": batch["sentences"][i][k],
                            "image_id": int(batch["image_id"][i]),
                        }
                    )
    finally:
        hook.remove()
        model.train(was_training)
    return records


def _single_target(records: list[dict[str, Any]], attributes: dict[int, dict], path: Path) -> list[dict]:
    """The records naming exactly one object, each with its ``attributes`` (``KeyError`` naming ``path``)."""
    out = []
    for rec in records:
        if len(rec["ann_ids"]) != 1 or rec["ann_ids"][0] < 0:
            continue
        ann_id = rec["ann_ids"][0]
        if ann_id not in attributes:
            raise KeyError(f"{path}: no record for ann_id {ann_id} (expression {rec['sentence']!r})")
        out.append({**rec, "attributes": attributes[ann_id]})
    return out


def attr_figures(
    train: list[dict[str, Any]], val: list[dict[str, Any]], l2: float, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Probe figures and LIRA's correlation from collected single-target records (see :func:`collect_states`
    plus ``attributes``); returns the figures and the val expressions (state dropped, readout added)."""
    if not train or not val:
        raise ValueError(f"attr_eval: {len(train)} train and {len(val)} val expressions; both must be > 0")
    stack = lambda recs: torch.stack([r["state"] for r in recs])  # noqa: E731  (N, D)
    labels = lambda recs: {a: [r["attributes"][a] for r in recs] for a in PROBED}  # noqa: E731
    probes, right = probe_attributes(stack(train), labels(train), stack(val), labels(val), l2=l2, seed=seed)
    ious = [r["iou"] for r in val]
    readout = iou_by_readout(right, ious)
    counts = readout.pop("number_right")
    expressions = [
        {
            **{k: v for k, v in r.items() if k != "state"},
            "right": {a: right[a][n] for a in PROBED},
            "number_right": counts[n],
        }
        for n, r in enumerate(val)
    ]
    figures = {
        "probes": probes,
        "readout_vs_iou": readout,
        "mean_iou_val": sum(ious) / len(ious),
        "n_train": len(train),
        "n_val": len(val),
        "state_dim": int(train[0]["state"].numel()),
    }
    return figures, expressions


def run_attr_eval(cfg: RunConfig, opts: AttrEvalOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load ``--version``, collect the train and val states, fit and score the probes (single process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds, split_by, val_split = cfg.eval.split
    if cfg.eval.reasoning:
        raise ValueError(
            f"--val_dataset {cfg.eval.val_dataset}: AttrEval needs a referring set (ds|splitBy|split)"
        )
    attributes = load_attributes(cfg.datasets.dataset_dir, ds)
    torch.manual_seed(cfg.loop.seed)
    model, tokenizer = build_lfllm(
        cfg.run.version, cfg.run.vision_pretrained, cfg.model, DTYPES[cfg.run.precision]
    )
    model.to(device)
    check_protocol(model.config, "teacher_forced")  # an answer_box model would be handed the true box
    collected = {}
    for name, split in (("train", opts.train_split), ("val", val_split)):
        part = cfg.replace(
            eval={"val_dataset": f"{ds}|{split_by}|{split}", "val_batch_size": opts.scenes_per_batch}
        )
        loader = build_val_loader(part, model.config, tokenizer, 0, 1)
        records = collect_states(model, loader, device, desc=f"attr_eval {name} ({split})")
        if opts.ask and name == "val":
            answers = ask_attributes(model, loader, tokenizer, device, cfg.generation.max_new_tokens)
            for n, rec in enumerate(records):
                rec["answers"] = {a: texts[n] for a, texts in answers.items()}
        collected[name] = _single_target(records, attributes, attributes_path(cfg.datasets.dataset_dir, ds))
    figures, expressions = attr_figures(collected["train"], collected["val"], opts.l2, cfg.loop.seed)
    if opts.ask:
        val = collected["val"]
        figures["asked"] = asked_figures(
            {a: [r["answers"][a] for r in val] for a in val[0]["answers"]},
            {a: [r["attributes"][a] for r in val] for a in val[0]["answers"]},
        )
    figures.update(
        version=cfg.run.version,
        dataset_dir=str(cfg.datasets.dataset_dir),
        val_dataset=cfg.eval.val_dataset,
        train_split=opts.train_split,
        l2=opts.l2,
        seed=cfg.loop.seed,
    )
    return figures, expressions


def format_table(figures: dict[str, Any]) -> str:
    """The printed report: probe vs majority accuracy per attribute, then the readout-vs-IoU figures."""
    lines = [f"{'attribute':<12} {'probe':>7} {'majority':>9} {'classes':>8}   (val, n={figures['n_val']})"]
    for name, p in figures["probes"].items():
        lines.append(f"{name:<12} {p['probe_acc']:7.3f} {p['majority_acc']:9.3f} {len(p['classes']):8d}")
    r = figures["readout_vs_iou"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"Spearman(#attributes right, IoU) = {r['spearman_right_vs_iou']:+.3f}")
    lines.append(
        f"mean IoU: all {len(figures['probes'])} right {fmt(r['mean_iou_all_right'])} (n={r['n_all_right']}), "
        f"not all right {fmt(r['mean_iou_not_all_right'])}"
    )
    by = ", ".join(f"{k}: {fmt(v['mean_iou'])} (n={v['n']})" for k, v in r["by_number_right"].items())
    lines.append(f"mean IoU by #right: {by}")
    for a in figures.get("asked", {}).values():
        lines.append(
            f"asked {a['question']!r}: exact {a['exact_acc']:.3f}, mentions {a['mention_acc']:.3f} (n={a['n']})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[AttrEvalOptions, RunConfig]:
    """The command line as the probe's options and ``train_ds.py --eval_only``'s configuration
    (``SystemExit`` with a message on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    add_option_flags(parser.add_argument_group("attribute probe"), AttrEvalOptions)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nand train_ds.py --eval_only's flags:\n")
    try:
        opts = options_from_args(AttrEvalOptions, known)
    except ValueError as exc:
        parser.error(str(exc))
    return opts, parse_config(["--eval_only", *rest])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``--out DIR --train_split --scenes_per_batch --l2 --ask`` plus ``train_ds.py --eval_only`` flags;
    prints the table, writes ``OUT/attr_eval.json`` and ``OUT/attr_eval.png``, returns the figures."""
    opts, cfg = parse_args(argv)
    figures, expressions = run_attr_eval(cfg, opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attr_eval.json").write_text(json.dumps({**figures, "expressions": expressions}, indent=2))
    write_png(out / "attr_eval.png", attr_plot(figures))
    print(format_table(figures))
    print(f"report: {out / 'attr_eval.json'}, plot: {out / 'attr_eval.png'}")
    return figures
