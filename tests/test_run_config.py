"""The typed run configuration (training/config.py): every flag is a declared field, the record round-trips
(and reads the flat records of earlier versions), range checks and resume rules come from field metadata,
and no library function takes the parser's namespace."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from model.options import ModelOptions
from training.config import (
    RunConfig,
    build_parser,
    parse_config,
)
from training.run_dir import check_resume_options
from training.serve.merge import merged_record
from utils.options import flag_name, is_option

ROOT = Path(__file__).resolve().parents[1]


def _fields_by_flag() -> dict[str, tuple[str, dataclasses.Field]]:
    out = {}
    for group, opts in RunConfig().groups().items():
        for f in dataclasses.fields(opts):
            assert is_option(f), f"{type(opts).__name__}.{f.name} is not declared with option()"
            assert flag_name(f) not in out, f"--{flag_name(f)} declared twice"
            out[flag_name(f)] = (group, f)
    return out


def test_every_train_flag_is_one_declared_field():
    fields = _fields_by_flag()
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == set(fields)  # no hand-written flag, no field without a flag
    for _group, f in fields.values():
        assert f.metadata["help"].strip(), f"--{flag_name(f)} has no help"


def test_a_field_declares_its_default_range_and_resume_rule():
    fields = _fields_by_flag()
    assert fields["epochs"][1].default == 10 and fields["epochs"][1].metadata["check"](0) == "must be >= 1"
    assert fields["lr"][1].metadata["check"](float("nan")) == "out of range"
    resume = {name for name, (_, f) in fields.items() if f.metadata.get("resume")}
    assert {"version", "batch_size", "seed", "lora_r", "caam", "conv_type", "refer_seg_data"} <= resume
    assert not {"epochs", "lr", "exp_name", "val_dataset", "max_new_tokens", "workers"} & resume
    assert set(RunConfig().resume_values()) == {
        f"{RunConfig.RECORD_KEYS[g]}.{f.name}" for g, f in fields.values() if f.metadata.get("resume")
    }


def test_a_config_built_in_code_is_checked_like_a_command_line():
    with pytest.raises(ValueError, match=r"--epochs 0: must be >= 1"):
        RunConfig().replace(loop={"epochs": 0})
    with pytest.raises(ValueError, match=r"--sample_rates '1,2': 2 rates for 1 datasets"):
        RunConfig().replace(datasets={"sample_rates": "1,2"})
    cfg = RunConfig().replace(loop={"seed": 3}, optim={"lr": 1e-4})
    assert (cfg.loop.seed, cfg.optim.lr, cfg.loop.epochs) == (3, 1e-4, 10)


def test_the_record_round_trips_and_reads_earlier_flat_records():
    cfg = parse_config(
        ["--lr", "1e-4", "--no_caam", "--depth_range=-0.5,2", "--disparity_set", "d_max=3", "--exp_name", "x"]
    )
    record = json.loads(json.dumps(cfg.to_record()))
    assert RunConfig.from_record(record) == cfg
    assert RunConfig.from_record({"config": record}) == cfg  # args.json
    # trainable.json / args.json of earlier versions: groups for the model, flat keys for the rest
    old = {"version": "base", "conv_type": "llava_llama_2", "model_options": {"use_caam": False}}
    back = RunConfig.from_record(old)
    assert (back.run.version, back.prompt.conv_type, back.model.use_caam) == ("base", "llava_llama_2", False)
    assert RunConfig.from_record({"args": {"batch_size": 5, "lr": 0.01}}).loop.batch_size == 5


def test_resume_compares_only_the_declared_fields(tmp_path):
    base = parse_config(["--version", "v"])
    assert check_resume_options(tmp_path, base, resuming=False) == []
    assert check_resume_options(tmp_path, base.replace(loop={"epochs": 20}), resuming=True) == []
    with pytest.raises(ValueError, match=r"loop_options.batch_size: 2 -> 4"):
        check_resume_options(tmp_path, base.replace(loop={"batch_size": 4}), resuming=True)
    # a run_options.json of an earlier version (flat keys + option groups) is read the same way
    (tmp_path / "run_options.json").write_text(
        json.dumps({"version": "v", "batch_size": 2, "model_options": {"use_depth": True}})
    )
    assert check_resume_options(tmp_path, base, resuming=True) == []
    with pytest.raises(ValueError, match=r"model_options.use_depth: True -> False"):
        check_resume_options(tmp_path, base.replace(model={"use_depth": False}), resuming=True)


def test_recorded_prompt_options_apply_unless_given(tmp_path):
    (tmp_path / "merge_info.json").write_text(
        json.dumps(
            {
                "conv_type": "llava_llama_2",
                "run_record": RunConfig().replace(prompt={"model_max_length": 99}).to_record(),
            }
        )
    )
    record = merged_record(tmp_path)
    plain = parse_config([]).with_recorded(record, groups=("prompt",))
    assert (plain.prompt.conv_type, plain.prompt.model_max_length) == ("llava_llama_2", 99)
    given = parse_config(["--conv_type", "llava_v1"]).with_recorded(record, groups=("prompt",))
    assert (given.prompt.conv_type, given.prompt.model_max_length) == ("llava_v1", 99)
    assert merged_record(tmp_path / "nothing") is None
    assert parse_config([]).with_recorded(None, ("prompt",)) == parse_config([])
    assert parse_config(["--no_caam"]).given_fields(ModelOptions) == {"use_caam"}


def _namespace_params(path: Path, root: Path = ROOT) -> list[str]:
    """Functions of ``path`` with a parameter annotated ``argparse.Namespace`` or named ``args``."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if "Namespace" in note or arg.arg == "args":
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}({arg.arg})")
    return out


#: The parsers: the only functions that may read the parser's namespace.
PARSERS = {
    "training/config.py": {"config_from_namespace", "model_options", "trainable_options", "disparity_config"},
    "utils/options.py": {"options_from_args"},
}


def test_no_library_function_takes_the_parsers_namespace(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import argparse\ndef build(args):\n    pass\ndef run(ns: argparse.Namespace):\n    pass\n"
    )
    assert [line.split(" ")[1] for line in _namespace_params(probe, tmp_path)] == ["build(args)", "run(ns)"]
    bad = []
    for package in ("training", "model", "dataset", "utils"):
        for path in sorted((ROOT / package).rglob("*.py")):
            allowed = PARSERS.get(str(path.relative_to(ROOT)), set())
            bad += [
                line for line in _namespace_params(path) if line.split(" ")[1].split("(")[0] not in allowed
            ]
    assert bad == []
