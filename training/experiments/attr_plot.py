"""AttrEval's figure: probe accuracy vs the majority baseline per attribute (left) and mean IoU by the number
of attributes read out correctly (right). OpenCV drawing (matplotlib is not a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, GRID, PAPER = (30, 30, 30), (220, 220, 220), (252, 252, 252)
PROBE_COLOUR, MAJORITY_COLOUR, IOU_COLOUR = (40, 110, 200), (170, 170, 170), (60, 160, 90)


def _text(
    image: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.6, centre: bool = False
) -> None:
    x, y = xy
    if centre:
        x -= cv2.getTextSize(text, FONT, scale, 1)[0][0] // 2
    cv2.putText(image, text, (int(x), int(y)), FONT, scale, INK, 1, cv2.LINE_AA)


def bar_panel(
    groups: Sequence[str],
    series: Sequence[tuple[str, tuple[int, int, int], Sequence[float | None]]],
    *,
    title: str,
    y_label: str,
    notes: Sequence[str] = (),
    width: int = 640,
    height: int = 520,
) -> np.ndarray:
    """Grouped bars in [0, 1]: one group per name of ``groups``, one bar per ``(label, colour RGB, values)``
    of ``series`` (None: no bar), the value above each bar, a legend when there are several series and
    ``notes`` under the group names. Returns (height, width, 3) uint8 RGB."""
    image = np.full((height, width, 3), PAPER, np.uint8)
    left, right, top, bottom = 84, 20, 90, 80
    plot_w, plot_h = width - left - right, height - top - bottom
    y0 = top + plot_h
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 - round(t * plot_h)
        cv2.line(image, (left, y), (left + plot_w, y), GRID, 1)
        _text(image, f"{t:.2f}", (left - 44, y + 5), 0.5)
    cv2.rectangle(image, (left, top), (left + plot_w, y0), INK, 1)
    _text(image, title, (width // 2, 30), 0.7, centre=True)
    label = np.full((26, plot_h, 3), PAPER, np.uint8)
    _text(label, y_label, (plot_h // 2, 18), 0.55, centre=True)
    image[top:y0, 4:30] = np.rot90(label)
    if len(series) > 1:  # legend
        x = left
        for name, colour, _ in series:
            cv2.rectangle(image, (x, 46), (x + 22, 64), colour, -1)
            _text(image, name, (x + 28, 62), 0.55)
            x += 40 + cv2.getTextSize(name, FONT, 0.55, 1)[0][0]
    slot = plot_w / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        x_group = left + g * slot + slot * 0.1
        for s, (_, colour, values) in enumerate(series):
            value = values[g]
            if value is None or not np.isfinite(value):
                continue
            x = int(x_group + s * bar)
            y = y0 - round(float(np.clip(value, 0, 1)) * plot_h)
            cv2.rectangle(image, (x, y), (int(x + bar) - 2, y0), colour, -1)
            _text(image, f"{value:.2f}", (int(x + bar / 2), y - 6), 0.45, centre=True)
        centre = int(left + (g + 0.5) * slot)
        _text(image, group, (centre, y0 + 24), 0.55, centre=True)
        if g < len(notes):
            _text(image, notes[g], (centre, y0 + 46), 0.45, centre=True)
    return image


def attr_plot(figures: dict[str, Any]) -> np.ndarray:
    """The two panels of AttrEval side by side, (520, 1280, 3) uint8 RGB."""
    probes = figures["probes"]
    names = list(probes)
    left = bar_panel(
        names,
        [
            ("linear probe on [SEG]", PROBE_COLOUR, [probes[a]["probe_acc"] for a in names]),
            ("majority class", MAJORITY_COLOUR, [probes[a]["majority_acc"] for a in names]),
        ],
        title=f"attribute read-out on val (n={figures['n_val']})",
        y_label="accuracy",
        notes=[f"{len(probes[a]['classes'])} classes" for a in names],
    )
    readout = figures["readout_vs_iou"]
    by = readout["by_number_right"]
    right = bar_panel(
        list(by),
        [("mean IoU", IOU_COLOUR, [v["mean_iou"] for v in by.values()])],
        title=f"IoU by attributes right (Spearman {readout['spearman_right_vs_iou']:+.2f})",
        y_label="mean IoU",
        notes=[f"n={v['n']}" for v in by.values()],
    )
    _text(right, "number of attributes read out correctly", (320, 512), 0.5, centre=True)
    return np.concatenate([left, right], axis=1)
