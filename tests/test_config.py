"""The train_ds.py command line: reference flags and defaults, switches both ways, DeepSpeed config."""

from __future__ import annotations

import pytest

from training.config import build_parser, model_options, parse_args, parse_config, trainable_options
from training.ds_config import deepspeed_config

# A LISA/LFLLM user's command line (flags of the published train_ds.py).
REFERENCE_COMMAND = [
    "--version", "llava-7b", "--vision_pretrained", "sam_vit_h_4b8939.pth", "--vision-tower", "clip",
    "--dataset_dir", "./dataset", "--dataset", "refer_seg", "--sample_rates", "1",
    "--refer_seg_data", "ref-urbanlf-syn||ref-urbanlf-real", "--val_dataset", "ref-urbanlf-real|syn|val",
    "--log_base_dir", "./runs", "--exp_name", "lfllm-7b", "--epochs", "10", "--steps_per_epoch", "500",
    "--batch_size", "2", "--grad_accumulation_steps", "10", "--val_batch_size", "1", "--workers", "4",
    "--lr", "0.0003", "--ce_loss_weight", "1.0", "--dice_loss_weight", "0.5", "--bce_loss_weight", "2.0",
    "--lora_r", "8", "--precision", "bf16", "--image_size", "1024", "--model_max_length", "512",
    "--out_dim", "256", "--conv_type", "llava_v1", "--train_mask_decoder", "--use_mm_start_end",
    "--gradient_checkpointing", "--auto_resume", "--print_freq", "1", "--local_rank", "0",
]  # fmt: skip


def test_reference_command_line_runs_with_reference_defaults():
    args = parse_args(REFERENCE_COMMAND)
    assert args.refer_seg_data == "ref-urbanlf-syn||ref-urbanlf-real"
    assert (args.lr, args.beta1, args.beta2) == (3e-4, 0.9, 0.95)
    defaults = parse_args([])
    expected = {
        "epochs": 10, "steps_per_epoch": 500, "batch_size": 2, "grad_accumulation_steps": 10,
        "val_batch_size": 1, "workers": 4, "lr": 3e-4, "ce_loss_weight": 1.0, "bce_loss_weight": 2.0,
        "dice_loss_weight": 0.5, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target_modules": "q_proj,v_proj", "num_classes_per_sample": 3, "precision": "bf16",
        "image_size": 1024, "model_max_length": 512, "out_dim": 256, "conv_type": "llava_v1",
        "train_mask_decoder": True, "use_mm_start_end": True, "gradient_checkpointing": True,
        "no_eval": False, "eval_only": False, "auto_resume": True, "caam": True, "depth": True,
        "log_base_dir": "./runs", "dataset_dir": "./dataset",
    }  # fmt: skip
    assert {k: getattr(defaults, k) for k in expected} == expected


@pytest.mark.parametrize(
    "name, off_flag",
    [
        ("gradient_checkpointing", "--no_gradient_checkpointing"),
        ("train_mask_decoder", "--no_train_mask_decoder"),
        ("use_mm_start_end", "--no_use_mm_start_end"),
        ("auto_resume", "--no_auto_resume"),
        ("caam", "--no_caam"),
        ("depth", "--no_depth"),
    ],
)
def test_every_switch_works_both_ways_and_the_last_wins(name, off_flag):
    assert getattr(parse_args([off_flag]), name) is False
    assert getattr(parse_args([off_flag, f"--{name}"]), name) is True
    assert getattr(parse_args([f"--{name}", off_flag]), name) is False


def test_no_eval_has_an_inverse():
    assert parse_args(["--no_eval"]).no_eval is True
    assert parse_args(["--no_eval", "--eval"]).no_eval is False


def test_depth_source_defaults_to_the_disparity_file():
    assert parse_args([]).depth_source == "file"
    assert parse_args(["--depth_source", "estimate"]).depth_source == "estimate"


def test_lisa_baseline_switches_reach_the_model_options():
    opts = model_options(parse_args(["--no_caam", "--no_depth", "--depth_range=-0.5,2"]))
    assert (opts.use_caam, opts.use_depth, opts.depth_range) == (False, False, (-0.5, 2.0))
    t = trainable_options(parse_args(["--lora_r", "0", "--no_train_mask_decoder"]))
    assert (t.lora_r, t.train_mask_decoder) == (0, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "sem_seg||depth_seg"], "unknown task"),
        (["--depth_range", "1,-1"], "lo must be < hi"),
        (["--depth_range", "abc"], "expected 'lo,hi'"),
        (["--val_dataset", "ref-urbanlf-syn|syn|val|x"], "ds|splitBy|split"),
        (["--depth_source", "oavc"], "invalid choice: 'oavc'"),
        (["--estimated_disparity_name", "sub/d.npy"], "plain file name ending in .npy"),
        (["--estimated_disparity_name", "d.png"], "plain file name ending in .npy"),
        (["--disparity_set", "views=none"], "bad view spec"),
        (["--disparity_set", "views=7_7_7"], "bad view spec"),
        (["--disparity_set", "no_such_field=1"], "no_such_field"),
        (["--disparity_set", "num_planes=many"], "num_planes expects int"),
        (["--disparity_set", "d_min=3"], "d_min < d_max"),
    ],
)
def test_inconsistent_options_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_lists_reference_and_light_field_flags():
    text = build_parser().format_help()
    for flag in (
        "--version",
        "--vision_pretrained",
        "--no_caam",
        "--caam_mode",
        "--eval_protocol",
        "--resume",
        "--depth_source",
        "--estimated_disparity_name",
    ):
        assert flag in text


def test_deepspeed_config_follows_the_reference_recipe():
    args = parse_config(["--epochs", "3", "--steps_per_epoch", "50", "--warmup_steps", "100"])
    cfg = deepspeed_config(args.optim, args.loop, args.run.precision, on_cpu=False)
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.0
    assert cfg["optimizer"]["params"]["torch_adam"] is False
    sched = cfg["scheduler"]["params"]
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    assert sched["total_num_steps"] == 150 and sched["warmup_max_lr"] == 3e-4
    assert sched["warmup_num_steps"] == 100
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] == 20
    small = parse_config(["--precision", "fp32", "--epochs", "1", "--steps_per_epoch", "10"])
    cpu = deepspeed_config(small.optim, small.loop, small.run.precision, True)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    # A warm-up longer than the run is clipped so that step 9 trains at the peak and step 10 below it.
    assert cpu["scheduler"]["params"]["warmup_num_steps"] == 7
