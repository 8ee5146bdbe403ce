"""Timing and reporting of the step benchmark: a peak-memory meter, FLOP counting, the environment record and
the markdown table (the yardstick's columns)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


# ---------------------------------------------------------------------------------------------- timing
class Meter:
    """Synchronised wall-clock timing and peak memory on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        """Start a new peak-memory window (CUDA only: the CPU's peak RSS never goes down)."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[float, str]:
        """(peak memory in GiB, what was measured)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GiB, "cuda max_memory_allocated"
        # ru_maxrss is in KiB on Linux; it never goes down, so it includes the build and earlier phases
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (getrusage)"

    def times(self, fn: Callable[[int], Any], warmup: int, steps: int) -> list[float]:
        """Seconds of each of ``fn(i)`` for ``i`` in ``warmup .. warmup + steps`` (the first ``warmup`` untimed)."""
        out = []
        for i in range(warmup + steps):
            self.sync()
            tic = time.perf_counter()
            fn(i)
            self.sync()
            if i >= warmup:
                out.append(time.perf_counter() - tic)
        return out


def count_flops(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Total FLOPs of ``fn()`` and their split by top-level module class (``Global`` minus the rest is
    ``other``: the work done outside any module, e.g. the losses and mask upsampling).

    The split is only exact for forward passes: FlopCounterMode attributes backward ops to modules
    loosely, so :func:`run_train` splits a separate forward and counts the whole step as one total."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    total = float(counter.get_total_flops())
    parts = {
        name: float(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if "." not in name and name != "Global"
    }
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return total, parts


def median_row(times: list[float]) -> dict[str, float]:
    """Median, minimum and count of ``times`` (a row's timing columns)."""
    return {"time_s_median": statistics.median(times), "time_s_min": min(times), "samples": len(times)}


# ---------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device, threads, load and CPU/GPU name: what a timing depends on."""
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
    }
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [
                ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln
            ]
            env["cpu"] = names[0] if names else platform.processor()
    return env


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table (the yardstick's columns)."""
    cfg = result["config"]
    lines = [
        "| preset | mode | gradient checkpointing | time | images/s | peak memory | counted work | achieved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ckpt = ("on" if cfg["gradient_checkpointing"] else "off") if row["mode"] == "train" else "–"
        memory = f"{row['peak_memory_GiB']:.2f} GiB" + ("" if "cuda" in row["peak_memory_kind"] else " RSS")
        unit = "s/query" if row["mode"] == "chat" else "s"
        lines.append(
            f"| {cfg['preset']} | {row['desc']} | {ckpt} | {row['time_s_median']:.4f} {unit} | "
            f"{_fmt(row.get('images_per_s'), '.2f')} | {memory} | "
            f"{_fmt(row.get('step_TFLOP'), '.4g')}{' TFLOP' if 'step_TFLOP' in row else ''} | "
            f"{_fmt(row.get('achieved_TFLOPs'), '.3g')}{' TFLOP/s' if 'achieved_TFLOPs' in row else ''} |"
        )
    return "\n".join(lines)
