"""What a run leaves behind besides checkpoints: ``args.json`` (+ git revision), ``ds_config.json``,
TensorBoard scalars and ``train_log.jsonl`` (one JSON line per logged optimiser step). Rank 0 only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from training.checkpoint import atomic_write_text


def git_revision() -> str:
    """``git describe --always --dirty`` of the code, or ``unknown`` outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """TensorBoard + JSON-lines logger; every method is a no-op off the main rank."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir))

    def write_run_files(self, config: dict[str, Any], ds_config: dict | None) -> None:
        """``args.json`` (the run record ``config``, command line, git revision) and ``ds_config.json``."""
        if not self.enabled:
            return
        record = {"config": config, "argv": sys.argv, "git": git_revision()}
        atomic_write_text(self.run_dir / "args.json", json.dumps(record, indent=2, default=str))
        if ds_config is not None:
            atomic_write_text(self.run_dir / "ds_config.json", json.dumps(ds_config, indent=2))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """TensorBoard ``prefix/name`` scalars and, for training, one line of ``train_log.jsonl``."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if prefix == "train":
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def metrics(self, step: int, results: dict[str, dict[str, float]], prefix: str = "val") -> None:
        """Every metric of every subset as ``val/<subset>/<metric>``."""
        if not self.enabled:
            return
        for subset, values in results.items():
            for key, value in values.items():
                if key != "n" and value == value:
                    self.writer.add_scalar(f"{prefix}/{subset}/{key}", value, step)

    def truncate_log(self, step: int) -> None:
        """Drop ``train_log.jsonl`` lines after ``step`` (a resumed run rewrites them). A line that does not
        read as a logged step — the torn last line of a run killed while writing it — is dropped with a
        warning: the checkpoint, not the log, is what the run resumes from."""
        path = self.run_dir / "train_log.jsonl"
        if not self.enabled or not path.is_file():
            return
        raw = path.read_bytes().decode("utf-8", errors="replace")
        lines = raw.splitlines()
        keep, bad = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            logged = _logged_step(line)
            if logged is None:
                bad.append(number)
            elif logged <= step:
                keep.append(line)
        if bad:
            torn = bad == [len(lines)] and not raw.endswith("\n")
            what = (
                f"its last line (line {bad[0]}) is torn, cut off while it was written"
                if torn
                else f"line(s) {', '.join(map(str, bad[:10]))} do not read as logged steps"
            )
            print(f"warning: {path}: {what}; dropped, the run resumes from its checkpoint", flush=True)
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> int | None:
    """The ``step`` of one ``train_log.jsonl`` line, None when the line is not a whole logged step."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
