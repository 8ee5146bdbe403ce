"""A resumed run is the run it continues: the LR schedule (warm-up 0, a one-step run, ``--extend_schedule``
continuing the LR without a jump), the options a checkpoint was trained with, an epoch's validation that
did not complete, a torn last line of ``train_log.jsonl``, and Ctrl-C (save ``last``, print the command
that resumes, exit 130).

The schedule is checked against hand-computed values and DeepSpeed's own WarmupDecayLR; the runs go
through ``train_ds.main`` in this process (one rank) on the tiny base, the Ctrl-C run as a subprocess."""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import REPO, _args, _env, _log
from training.ds_config import RunSchedule, Schedule, clipped_warmup, deepspeed_config
from training.options import LoopOptions, OptimOptions
from training.run_log import RunLogger
from training.trainer import StopRequest, _recorded_schedule, read_checkpoint_record

LR = 1e-3


# ================================================================================== the schedule (units)
def _deepspeed_lrs(warmup: int, total: int, lr: float = LR) -> list[float]:
    """The LR DeepSpeed's WarmupDecayLR (linear warm-up) sets at iterations -1 .. total."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupDecayLR(
        opt, total_num_steps=total, warmup_max_lr=lr, warmup_num_steps=warmup, warmup_type="linear"
    )
    out = [opt.param_groups[0]["lr"]]
    for _ in range(total + 1):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize(("warmup", "total"), [(3, 10), (1, 10), (2, 4), (5, 6)])
def test_schedule_is_deepspeeds_warmup_decay_lr_at_every_step(warmup, total):
    sched = Schedule(LR, warmup, total)
    ours = [sched.lr_at(it) for it in range(-1, total + 1)]
    assert ours == pytest.approx(_deepspeed_lrs(warmup, total), abs=1e-12)


def test_schedule_hand_values_10_steps_warmup_3():
    sched = Schedule(1.0, 3, 10)
    # step s trains with the LR after iteration s-2: warm-up i/3 for i < 3, then (10 - i) / 7
    expected = [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7]
    assert [sched.lr_of_step(s) for s in range(1, 11)] == pytest.approx(expected)
    assert sched.lr_at(10) == 0.0 and sched.end == 10
    assert sched.effective_warmup == 3 and Schedule(1.0, 1, 10).effective_warmup == 2


def test_no_warmup_starts_at_the_peak_and_falls_to_zero():
    sched = Schedule(2.0, 0, 4)
    assert sched.effective_warmup == 0
    assert [sched.lr_of_step(s) for s in range(1, 5)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert sched.lr_at(3) == 0.0 and sched.lr_at(7) == 0.0, "0 after the last step, never negative"


def test_clipped_warmup_and_from_options():
    assert clipped_warmup(100, 10) == 7, "steps 9 and 10 (iterations 7, 8): the peak, then below it"
    sched = Schedule(1.0, clipped_warmup(100, 10), 10)
    assert sched.lr_of_step(9) == 1.0 and 0 < sched.lr_of_step(10) < 1.0
    assert clipped_warmup(3, 10) == 3
    assert clipped_warmup(1, 10) == 0, "DeepSpeed's shortest warm-up is 2: a shorter one is none"
    assert clipped_warmup(100, 4) == 0 and clipped_warmup(100, 5) == 2
    assert clipped_warmup(0, 10) == 0
    assert clipped_warmup(5, 1) == 0, "a one-step run has no warm-up"
    assert clipped_warmup(5, 0) == 0
    one = Schedule.from_options(
        OptimOptions(lr=0.5, warmup_steps=100), LoopOptions(epochs=1, steps_per_epoch=1)
    )
    assert (one.warmup_steps, one.total_steps) == (0, 1)
    assert one.lr_of_step(1) == 0.5, "the one step of a one-step run trains at the peak"
    sched = Schedule.from_options(
        OptimOptions(lr=0.5, warmup_steps=3), LoopOptions(epochs=2, steps_per_epoch=5)
    )
    assert sched == Schedule(0.5, 3, 10)


def test_the_deepspeed_config_entry_records_the_same_schedule():
    optim, loop = OptimOptions(lr=2e-4, warmup_steps=7), LoopOptions(epochs=3, steps_per_epoch=4)
    ds = deepspeed_config(optim, loop, "fp32", on_cpu=True)
    legacy = {"lr_scheduler": {"last_batch_iteration": 5}, "ds_config": ds}
    assert _recorded_schedule(legacy) == Schedule.from_options(optim, loop) == Schedule(2e-4, 7, 12)
    recorded = {"lr_scheduler": {"last_batch_iteration": 5, "schedule": Schedule(1.0, 2, 6).to_json()}}
    assert _recorded_schedule(recorded) == Schedule(1.0, 2, 6)
    assert _recorded_schedule({"lr_scheduler": {"last_batch_iteration": 5}}) is None


def test_extension_of_a_finished_run_continues_without_a_jump():
    old = Schedule(1.0, 2, 6)  # steps 1..6: 0, 0, .5, 1, .75, .5; after the last (iteration 5): .25
    new = old.extended(5, 12)
    assert [new.lr_of_step(s) for s in range(1, 7)] == [old.lr_of_step(s) for s in range(1, 7)]
    first_new = new.lr_of_step(7)
    assert first_new == pytest.approx(0.25) and first_new <= old.lr_of_step(6)
    lrs = [new.lr_at(it) for it in range(5, 13)]
    assert lrs == pytest.approx([0.25 * (12 - it) / 7 for it in range(5, 13)])
    steps = [a - b for a, b in itertools.pairwise(lrs)]
    assert all(d == pytest.approx(0.25 / 7) for d in steps), "linear, one decay increment per step"
    assert new.lr_at(12) == 0.0 and new.end == 12
    assert "extended after step 6 to decay over 12 steps" in new.describe()


def test_extension_mid_decay_and_twice():
    old = Schedule(1.0, 2, 10)
    reached = old.lr_at(4)  # (10 - 4) / 8
    new = old.extended(4, 20)
    assert new.lr_at(4) == pytest.approx(reached)
    assert new.lr_at(5) == pytest.approx(reached * 15 / 16) and new.lr_at(5) < old.lr_at(4)
    again = new.extended(10, 30)
    at10 = reached * 10 / 16
    assert again.lr_at(10) == pytest.approx(at10)
    assert again.lr_at(11) == pytest.approx(at10 * 19 / 20)
    assert again.lr_at(30) == 0.0 and again.end == 30
    assert Schedule.from_json(json.loads(json.dumps(again.to_json()))) == again


def test_extension_while_warming_up_finishes_the_warmup():
    old = Schedule(1.0, 4, 6)
    new = old.extended(1, 20)
    lrs = [new.lr_at(it) for it in range(-1, 21)]
    assert lrs[:3] == [old.lr_at(it) for it in range(-1, 2)]
    assert new.lr_at(2) == pytest.approx(0.5) and new.lr_at(4) == pytest.approx(1.0)
    assert new.lr_at(12) == pytest.approx(0.5) and new.lr_at(20) == 0.0
    assert max(abs(a - b) for a, b in itertools.pairwise(lrs)) <= 0.25 + 1e-12, "no jump"


def test_extension_of_a_finished_run_without_warmup_still_trains():
    old = Schedule(1.0, 0, 4)  # steps 1..4: 1, .75, .5, .25
    new = old.extended(3, 8)
    # it goes on from step 4's LR (0.25), falling linearly: steps 5..8 at .25 * 5/6 .. .25 * 2/6
    assert [new.lr_of_step(s) for s in range(1, 9)] == pytest.approx(
        [1, 0.75, 0.5, 0.25, *(0.25 * k / 6 for k in (5, 4, 3, 2))]
    )


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def test_run_schedule_steps_saves_and_loads_its_schedule():
    sched = Schedule(1.0, 3, 10).extended(6, 16)
    opt = _optimizer()
    run = RunSchedule(opt, sched)
    assert opt.param_groups[0]["lr"] == 0.0, "the LR of the first step"
    for _ in range(8):
        run.step()
    assert run.last_batch_iteration == 7
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(7)) == pytest.approx(run.get_lr()[0])
    assert run.get_last_lr() == [opt.param_groups[0]["lr"]]
    state = json.loads(json.dumps(run.state_dict()))  # a checkpoint's copy
    assert state["last_batch_iteration"] == 7

    opt2 = _optimizer()
    other = RunSchedule(opt2, Schedule(5.0, 0, 3))
    other.load_state_dict(state)
    assert other.schedule == sched and other.loaded_schedule == sched
    assert other.last_batch_iteration == 7
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched.lr_at(7))
    other.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched.lr_at(8))


def test_run_schedule_loads_deepspeeds_own_state():
    opt = _optimizer()
    sched = Schedule(1.0, 2, 6)
    run = RunSchedule(opt, sched)
    run.load_state_dict({"last_batch_iteration": 3})
    assert run.loaded_schedule is None and run.schedule == sched
    assert run.last_batch_iteration == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75)
    run.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


# ============================================================================ the torn log line (unit)
def _write_log(run: Path, steps: list[int]) -> list[str]:
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) for s in steps]
    (run / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    return lines


def test_truncate_log_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    logger = RunLogger(tmp_path, enabled=True)
    try:
        lines = _write_log(tmp_path, [1, 2, 3])
        with open(tmp_path / "train_log.jsonl", "a") as f:
            f.write('{"step": 4, "loss": 0.2')  # cut off while written
        logger.truncate_log(2)
        assert (tmp_path / "train_log.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
        out = capsys.readouterr().out
        assert "warning:" in out and "last line (line 4) is torn" in out

        lines = _write_log(tmp_path, [1, 2])
        with open(tmp_path / "train_log.jsonl", "a") as f:
            f.write('["not", "a", "step"]\n{"step": true}\n')
        logger.truncate_log(5)
        assert (tmp_path / "train_log.jsonl").read_text() == "".join(line + "\n" for line in lines)
        out = capsys.readouterr().out
        assert "line(s) 3, 4 do not read as logged steps" in out

        _write_log(tmp_path, [1, 2])
        logger.truncate_log(2)
        assert capsys.readouterr().out == "", "a clean log: no warning"
    finally:
        logger.close()


# =============================================================================== the stop request (unit)
def _signal_while_deferred(stop: StopRequest, sig: int) -> None:
    """Send ``sig`` to this process inside ``stop.deferred()``; it must only be recorded."""
    try:
        with stop.deferred():
            signal.raise_signal(sig)
    except KeyboardInterrupt:
        pytest.fail(f"signal {sig} inside the training loop interrupted at once instead of being deferred")


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="needs POSIX signals")
def test_stop_request_defers_inside_training_and_interrupts_outside():
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup
    stop = StopRequest()
    stop.verbose = False
    restore = stop.install()
    try:
        assert not stop.requested
        _signal_while_deferred(stop, signal.SIGINT)
        assert stop.requested and stop.exit_code == 130 and stop.name == "Ctrl-C"
        with pytest.raises(KeyboardInterrupt), stop.abortable():
            pass  # a request made before an abortable block (validation) stops on entry
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # outside the loop: at once
        restore()
        restore = stop.install()  # a fresh install forgets the request
        assert not stop.requested
        _signal_while_deferred(stop, signal.SIGTERM)
        assert stop.exit_code == 128 + signal.SIGTERM and stop.name == "SIGTERM"
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler restored"


# ====================================================================== end to end, in this process
@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group for the in-process ``train_ds.main`` runs of this module, torn down after."""
    import deepspeed.comm.torch  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**env, "DS_ACCELERATOR": "cpu"}.items():
            mp.setenv(key, value)
        mp.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None and hasattr(groups, "_WORLD_GROUP"):
            mp.setattr(groups, "_WORLD_GROUP", None)  # a clone of an earlier, destroyed world group
        yield
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_args(base, data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """The tiny recipe, one micro-batch per step, the schedule's warm-up 2, no validation unless asked."""
    return _args(base, data, runs, name, "--grad_accumulation_steps", "1", "--warmup_steps", "2", *extra)


def _main(args: list[str], capsys) -> tuple[int, str]:
    import train_ds

    capsys.readouterr()
    rc = train_ds.main(args)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _lrs(run: Path) -> list[float]:
    log = _log(run)
    return [log[s]["lr"] for s in sorted(log)]


SIX = ("--epochs", "1", "--steps_per_epoch", "6")


@pytest.fixture(scope="module")
def finished(tiny_base, tiny_dataset, tmp_path_factory, one_rank):
    """A finished 6-step run (CAAM + depth, warm-up 2, no validation): its runs folder and arguments."""
    import train_ds

    runs = tmp_path_factory.mktemp("runs")
    args = _train_args(tiny_base, tiny_dataset, runs, "base", *SIX, "--no_eval")
    assert train_ds.main(args) == 0
    return runs, args


def _into(args: list[str], name: str, *extra: str) -> list[str]:
    """``args`` for run ``name`` (its own folder), with ``extra`` appended."""
    out = list(args)
    out[out.index("--exp_name") + 1] = name
    return [*out, *extra]


def _copy(finished, name: str) -> tuple[Path, list[str]]:
    """The finished run, copied to run ``name`` (same options, its own folder)."""
    runs, args = finished
    shutil.copytree(runs / "base", runs / name)
    (runs / name / ".lock").unlink(missing_ok=True)
    return runs / name, _into(args, name)


def test_finished_run_logged_the_schedule(finished):
    runs, _ = finished
    # the LR step s trained with (iteration s-2; DeepSpeed's linear warm-up over 2, decay over 4)
    assert _lrs(runs / "base") == pytest.approx([0.0, 0.0, 0.5 * LR, LR, 0.75 * LR, 0.5 * LR])
    record = read_checkpoint_record(runs / "base" / "ckpt_model" / "last")
    assert record["lr_scheduler"]["last_batch_iteration"] == 5
    assert Schedule.from_json(record["lr_scheduler"]["schedule"]) == Schedule(LR, 2, 6)
    assert record["client"]["loop"] == {"epochs": 1, "steps_per_epoch": 6}
    assert record["client"]["options"]["model_options.use_caam"] is True


def test_no_warmup_and_a_one_step_run_train(tiny_base, tiny_dataset, tmp_path, one_rank, capsys):
    runs = tmp_path / "runs"
    args = _train_args(tiny_base, tiny_dataset, runs, "w0", "--epochs", "1", "--steps_per_epoch", "2")
    rc, out = _main([*args, "--warmup_steps", "0", "--no_eval"], capsys)
    assert rc == 0, out[-3000:]
    # no warm-up over 2 steps: steps at 1 and 1/2 of the peak; logged (after each step): 1/2, 0
    assert _lrs(runs / "w0") == pytest.approx([LR, 0.5 * LR])
    record = read_checkpoint_record(runs / "w0" / "ckpt_model" / "last")
    assert Schedule.from_json(record["lr_scheduler"]["schedule"]) == Schedule(LR, 0, 2)

    args = _train_args(tiny_base, tiny_dataset, runs, "one", "--epochs", "1", "--steps_per_epoch", "1")
    rc, out = _main([*args, "--warmup_steps", "100", "--no_eval"], capsys)
    assert rc == 0, out[-3000:]
    assert sorted(_log(runs / "one")) == [1]
    record = read_checkpoint_record(runs / "one" / "ckpt_model" / "last")
    sched = Schedule.from_json(record["lr_scheduler"]["schedule"])
    assert sched == Schedule(LR, 0, 1) and sched.lr_of_step(1) == LR, "the one step trains at the peak"
    assert record["global_steps"] == 1


def test_another_length_needs_extend_schedule_and_the_lr_goes_on(finished, capsys):
    run, args = _copy(finished, "ext")
    before = _log(run)
    longer = [*args, "--epochs", "2"]
    rc, out = _main(longer, capsys)
    assert rc == 2, out[-3000:]
    assert "another learning-rate schedule" in out and "--extend_schedule" in out
    assert "length: 6 steps (--epochs 1 x --steps_per_epoch 6) -> 12" in out
    assert _log(run) == before, "nothing was trained"

    rc, out = _main([*longer, "--extend_schedule", "--lr", "2e-3"], capsys)
    assert rc == 2 and "--lr: 0.001 -> 0.002" in out and "--resume_with_changes" in out, out[-3000:]

    rc, out = _main([*longer, "--extend_schedule"], capsys)
    assert rc == 0, out[-3000:]
    assert "extended after step 6 to decay over 12 steps" in out and "at step 6" in out
    log = _log(run)
    assert sorted(log) == list(range(1, 13))
    assert {s: log[s] for s in range(1, 7)} == before, "the old steps' log kept"
    lrs = _lrs(run)
    # the schedule had reached .25 of the peak for step 7 (iteration 5); from there linear to 0 at iteration 12
    assert lrs[6:] == pytest.approx([0.25 * LR * k / 7 for k in (7, 6, 5, 4, 3, 2)])
    assert lrs[6] <= lrs[5], "the first new step's LR is not above the last old one's"
    record = read_checkpoint_record(run / "ckpt_model" / "last")
    sched = Schedule.from_json(record["lr_scheduler"]["schedule"])
    assert sched == Schedule(LR, 2, 6).extended(5, 12) and sched.lr_at(12) == 0.0

    rc, out = _main([*longer, "--extend_schedule"], capsys)  # the same command again: done
    assert rc == 0 and "nothing to do: the run is at step 12 of 12" in out, out[-3000:]


def test_a_checkpoint_of_other_options_is_refused_and_never_one_that_does_not_fit(finished, capsys):
    runs, args = finished
    ckpt = runs / "base" / "ckpt_model"
    # A CAAM + depth checkpoint resumed into the LISA baseline (another run folder, explicit --resume).
    lisa = _into(args, "lisa", "--no_caam", "--no_depth", "--resume", str(ckpt))
    rc, out = _main(lisa, capsys)
    assert rc == 2, out[-3000:]
    assert f"{ckpt / 'last'}: this checkpoint was trained with other options than this run's" in out
    assert "model_options.use_caam: True -> False" in out and "model_options.use_depth: True -> False" in out
    assert "--resume_with_changes" in out and "lora_r" not in out

    # Its trainable tensors fit the baseline (CAAM and the depth tokens add none here): accepted, noted.
    rc, out = _main([*lisa, "--resume_with_changes"], capsys)
    assert rc == 0, out[-3000:]
    assert (
        f"note: --resume_with_changes: continuing {ckpt / 'last'} with model_options.use_caam: True -> False"
        in out
    )
    assert "nothing to do: the run is at step 6 of 6" in out

    # Another LoRA rank changes the trainable shapes: refused even with --resume_with_changes.
    lora = _into(args, "lora", "--lora_r", "16", "--resume", str(ckpt))
    rc, out = _main(lora, capsys)
    assert rc == 2, out[-3000:]
    assert "trainable_options.lora_r: 8 -> 16" in out and "--resume_with_changes" in out
    rc, out = _main([*lora, "--resume_with_changes"], capsys)
    assert rc == 2, out[-3000:]
    assert "its trainable weights do not fit this run's model" in out
    assert "(the options differ: trainable_options.lora_r: 8 -> 16)" in out and "of another shape" in out
    assert "lora_A" in out and "(8, 64) in the checkpoint, (16, 64) here" in out
    assert not (runs / "lora" / "train_log.jsonl").exists(), "not a step trained"


def test_a_validation_that_did_not_complete_runs_on_resume(
    tiny_base, tiny_dataset, tmp_path, one_rank, capsys, monkeypatch
):
    from training.trainer import Trainer

    runs = tmp_path / "runs"
    args = _train_args(tiny_base, tiny_dataset, runs, "val", "--epochs", "1", "--steps_per_epoch", "1")
    original = Trainer.validate

    def crash(self, step):
        raise RuntimeError("simulated crash in validation")

    monkeypatch.setattr(Trainer, "validate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _main(args, capsys)
    run = runs / "val"
    assert not (run / "val_record.json").exists()
    record = read_checkpoint_record(run / "ckpt_model" / "last")
    assert record["client"]["pending_validation"] == 1, "the epoch's checkpoint was saved before validation"

    monkeypatch.setattr(Trainer, "validate", original)
    rc, out = _main(args, capsys)
    assert rc == 0, out[-3000:]
    assert "the checkpoint of step 1 was saved before its validation" in out
    assert "validation after step 1" in out
    val = json.loads((run / "val_record.json").read_text())
    assert [h["step"] for h in val["history"]] == [1] and val["history"][0]["gIoU"] >= 0
    assert val["best_step"] == 1 and (run / "eval.json").is_file()
    assert read_checkpoint_record(run / "ckpt_model" / "best")["client"]["pending_validation"] is None

    rc, out = _main(args, capsys)
    assert rc == 0 and "nothing to do" in out, out[-3000:]
    assert "saved before its validation" not in out and "validation after step" not in out


def test_a_torn_last_log_line_is_dropped_on_resume(finished, capsys):
    run, args = _copy(finished, "torn")
    text = (run / "train_log.jsonl").read_text()
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 8.1, "ce_l')
    rc, out = _main(args, capsys)
    assert rc == 0, out[-3000:]
    assert "train_log.jsonl: its last line (line 7) is torn" in out
    assert "resumed from" in out and "at step 6" in out
    assert (run / "train_log.jsonl").read_text() == text


# ============================================================================== Ctrl-C, as a process
def _wait_for_first_step(proc: subprocess.Popen, run: Path, err: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"training ended before the signal (rc {proc.returncode}):\n{err.read_text()[-3000:]}"
            )
        try:
            if _log(run):
                return
        except (FileNotFoundError, json.JSONDecodeError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail("no step was logged in time")


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="needs POSIX signals")
def test_ctrl_c_saves_last_and_prints_the_command_that_resumes(
    tiny_base, tiny_dataset, tmp_path, one_rank, capsys
):
    runs = tmp_path / "runs"
    args = _train_args(tiny_base, tiny_dataset, runs, "sig", "--epochs", "1", "--steps_per_epoch", "200")
    args += ["--no_eval"]
    run = runs / "sig"
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train_ds.py"), *args], cwd=REPO, env=_env(), stdout=out, stderr=err
        )
        try:
            _wait_for_first_step(proc, run, err_file)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_file.read_text()
    assert rc == 130, stderr[-3000:]
    stopped = [ln for ln in stderr.splitlines() if ln.startswith("Ctrl-C: stopped after step ")]
    assert stopped, stderr[-3000:]
    step = int(stopped[0].split("Ctrl-C: stopped after step ")[1].split(";")[0])
    assert 1 <= step < 200
    assert f"saved {run / 'ckpt_model' / 'last'} (step {step})" in stopped[0]
    assert "Resume with:" in stderr
    command = shlex.split(stderr.split("Resume with:\n", 1)[1].splitlines()[0])
    assert command[0] == sys.executable and command[1].endswith("train_ds.py") and command[2:] == args
    assert (run / "ckpt_model" / "latest").read_text().strip() == "last"
    record = read_checkpoint_record(run / "ckpt_model" / "last")
    assert record["global_steps"] == step and record["client"]["pending_validation"] is None
    assert max(_log(run)) == step

    # The printed command resumes at the saved step (one more step here, --max_steps, to keep it short).
    rc, out = _main([*command[2:], "--max_steps", str(step + 1)], capsys)
    assert rc == 0, out[-3000:]
    assert f"resumed from {run / 'ckpt_model' / 'last'} at step {step}" in out
    log = _log(run)
    assert sorted(log) == list(range(1, step + 2))
    assert log[step + 1]["lr"] == pytest.approx(Schedule(LR, 2, 200).lr_of_step(step + 1))


def test_a_checkpoint_from_before_an_option_existed_resumes_as_its_default():
    """An option added later (``gres``, ``exprs_per_question``) is absent from an older checkpoint's record:
    it counts at its default, so the run resumes; a real difference is still reported."""
    from training.config import RunConfig
    from training.run_dir import option_differences, with_later_defaults

    current = RunConfig.from_record({}).resume_values()
    older = {
        k: v for k, v in current.items() if k not in ("model_options.gres", "loop_options.exprs_per_question")
    }
    assert option_differences(older, current)  # compared as written, the missing keys differ
    assert option_differences(with_later_defaults(older), current) == []
    changed = {**older, "model_options.use_caam": not current["model_options.use_caam"]}
    assert option_differences(with_later_defaults(changed), current) == [
        f"model_options.use_caam: {changed['model_options.use_caam']!r} -> {current['model_options.use_caam']!r}"
    ]
