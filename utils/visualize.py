"""Pictures a person reads: mask overlays with the expression and a legend, colour-mapped disparity with a
colour bar, and the best/worst summary sheet of a validation run.

Every picture is RGB uint8 (H, W, 3) and at least :data:`MIN_LONG_SIDE` px on its long side: small views
are enlarged by an integer factor with nearest-neighbour sampling (each pixel stays a sharp square),
before anything is drawn, so text is rendered at the final size. Drawing is OpenCV (Hershey font, anti-
aliased). Colours: ground truth green (outline), prediction red (filled, outlined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

MIN_LONG_SIDE = 512
GT_COLOUR = (40, 230, 40)
PRED_COLOUR = (255, 50, 50)
BAND_COLOUR = (24, 24, 24)
TEXT_COLOUR = (245, 245, 245)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5, colour=PRED_COLOUR) -> np.ndarray:
    """Blend ``colour`` over the pixels of ``mask`` (H, W) in an (H, W, 3) uint8 RGB image; others unchanged."""
    out = image_rgb.astype(np.float32)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def upscale_factor(height: int, width: int, min_long_side: int = MIN_LONG_SIDE) -> int:
    """Smallest integer factor that brings the long side of (height, width) to ``min_long_side`` or more."""
    return max(1, math.ceil(min_long_side / max(height, width)))


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W[, C]) -> (H·f, W·f[, C]) by pixel repetition (nearest neighbour; masks stay binary)."""
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def font_scale(width: int) -> float:
    """Hershey font scale that reads well on a picture ``width`` px wide (0.6 at 512 px)."""
    return float(np.clip(width / 850.0, 0.55, 1.3))


def _line_height(scale: float) -> int:
    (_, h), base = cv2.getTextSize("Ag", FONT, scale, 1)
    return int(h + base + 8 * scale + 4)


def wrap_text(text: str, width: int, scale: float, max_lines: int = 3) -> list[str]:
    """Split ``text`` into lines that fit ``width`` px at ``scale`` (at most ``max_lines``, the last with …)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if cv2.getTextSize(trial, FONT, scale, 1)[0][0] <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1 :])]
        while cv2.getTextSize(lines[-1] + "...", FONT, scale, 1)[0][0] > width and len(lines[-1]) > 1:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def text_band(lines: Sequence[str], width: int, scale: float | None = None) -> np.ndarray:
    """A dark (h, width, 3) band with ``lines`` written in light text, left-aligned."""
    scale = font_scale(width) if scale is None else scale
    step = _line_height(scale)
    band = np.full((step * len(lines) + 6, width, 3), BAND_COLOUR, np.uint8)
    thickness = 2 if scale >= 0.9 else 1
    for i, line in enumerate(lines):
        y = 4 + step * i + cv2.getTextSize("Ag", FONT, scale, 1)[0][1] + 4
        cv2.putText(band, line, (8, y), FONT, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)
    return band


def legend_band(items: Sequence[tuple[tuple[int, int, int] | None, str]], width: int) -> np.ndarray:
    """A band of legend entries: a colour swatch (or none) followed by its label, wrapped onto rows."""
    scale = font_scale(width)
    step = _line_height(scale)
    text_h = cv2.getTextSize("Ag", FONT, scale, 1)[0][1]
    swatch = text_h + 4
    rows: list[list[tuple[tuple[int, int, int] | None, str, int]]] = [[]]
    x = 8
    for colour, label in items:
        w = (swatch + 6 if colour else 0) + cv2.getTextSize(label, FONT, scale, 1)[0][0] + 18
        if x + w > width and rows[-1]:
            rows.append([])
            x = 8
        rows[-1].append((colour, label, x))
        x += w
    band = np.full((step * len(rows) + 6, width, 3), BAND_COLOUR, np.uint8)
    for r, row in enumerate(rows):
        y = 4 + step * r + text_h + 4
        for colour, label, x0 in row:
            if colour:
                cv2.rectangle(band, (x0, y - text_h - 1), (x0 + swatch, y + 3), colour, -1)
                x0 += swatch + 6
            cv2.putText(band, label, (x0, y), FONT, scale, TEXT_COLOUR, 1, cv2.LINE_AA)
    return band


def _outline(image: np.ndarray, mask: np.ndarray, colour, thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, colour, thickness, cv2.LINE_AA)


def annotated_overlay(
    image_rgb: np.ndarray,
    pred_mask: np.ndarray | None,
    *,
    expression: str,
    gt_mask: np.ndarray | None = None,
    iou: float | None = None,
    score: float | None = None,
    answer: str | None = None,
    min_long_side: int = MIN_LONG_SIDE,
) -> np.ndarray:
    """The view enlarged to ``min_long_side``, the prediction filled red, the ground truth outlined green,
    the expression above and a legend below (colours, IoU, score, the answer when given).

    ``image_rgb`` (H, W, 3) uint8; ``pred_mask`` / ``gt_mask`` (H, W) bool or None (no prediction: the
    legend says so). Returns (H', W', 3) uint8 RGB with max(H', W') >= ``min_long_side``.
    """
    f = upscale_factor(*image_rgb.shape[:2], min_long_side)
    view = upscale_nearest(image_rgb, f)
    thick = max(2, f // 2)
    if pred_mask is not None:
        big = upscale_nearest(pred_mask.astype(bool), f)
        view = overlay(view, big, 0.45)
        _outline(view, big, PRED_COLOUR, thick)
    if gt_mask is not None:
        _outline(view, upscale_nearest(gt_mask.astype(bool), f), GT_COLOUR, thick)
    width = view.shape[1]
    header = text_band(wrap_text(f'"{expression}"', width - 16, font_scale(width)), width)
    items: list[tuple[tuple[int, int, int] | None, str]] = []
    if gt_mask is not None:
        items.append((GT_COLOUR, "ground truth"))
    items.append((PRED_COLOUR, "prediction") if pred_mask is not None else (None, "no [SEG]: no mask"))
    if iou is not None:
        items.append((None, f"IoU {iou:.2f}"))
    if score is not None:
        items.append((None, f"score {score:.2f}"))
    parts = [header, view, legend_band(items, width)]
    if answer:
        parts.append(text_band(wrap_text(f"answer: {answer}", width - 16, font_scale(width), 2), width))
    return np.concatenate(parts, axis=0)


def colorize_disparity(
    disparity_px: np.ndarray, *, min_long_side: int = MIN_LONG_SIDE, title: str = "disparity (px)"
) -> np.ndarray:
    """Disparity (H, W) float px -> the turbo colour map (near = red) enlarged like the views, with a title
    and a vertical colour bar labelled in px on the right. Returns (H', W', 3) uint8 RGB."""
    d = np.asarray(disparity_px, np.float32)
    finite = np.isfinite(d)
    lo, hi = (float(d[finite].min()), float(d[finite].max())) if finite.any() else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    norm = np.where(finite, (d - lo) / (hi - lo), 0.0)
    image = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    image = upscale_nearest(np.ascontiguousarray(image), upscale_factor(*d.shape, min_long_side))
    h, width = image.shape[:2]
    scale = font_scale(width)
    bar_w, label_w = max(16, width // 28), int(cv2.getTextSize("-0.00 px", FONT, scale, 1)[0][0] + 16)
    ramp = np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(bar_w, 1)
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO)[..., ::-1]
    labels = np.full((h, label_w, 3), BAND_COLOUR, np.uint8)
    text_h = cv2.getTextSize("0", FONT, scale, 1)[0][1]
    for t in range(5):
        frac = t / 4
        y = round((1 - frac) * (h - 1))
        cv2.line(labels, (0, y), (6, y), TEXT_COLOUR, 1)
        ty = int(np.clip(y + text_h // 2, text_h + 2, h - 3))
        value = lo + frac * (hi - lo)
        cv2.putText(labels, f"{value:.2f} px", (10, ty), FONT, scale, TEXT_COLOUR, 1, cv2.LINE_AA)
    gap = np.full((h, 8, 3), BAND_COLOUR, np.uint8)
    body = np.concatenate([image, gap, np.ascontiguousarray(bar), labels], axis=1)
    note = f"{title}: near = red, far = blue"
    header = text_band(wrap_text(note, body.shape[1] - 16, scale), body.shape[1], scale)
    return np.concatenate([header, body], axis=0)


def side_by_side(images: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Place RGB images left to right, top-aligned, on a dark background with ``gap`` px between."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), BAND_COLOUR, np.uint8)
    x = 0
    for im in images:
        out[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out


def fit_width(image: np.ndarray, width: int) -> np.ndarray:
    """Resize ``image`` to ``width`` px wide, keeping its aspect ratio (area filter when shrinking)."""
    h, w = image.shape[:2]
    height = max(1, round(h * width / w))
    interp = cv2.INTER_AREA if width < w else cv2.INTER_NEAREST
    return cv2.resize(image, (width, height), interpolation=interp)


Tile = tuple[np.ndarray, str]
"""A sheet tile: an RGB picture and its caption (e.g. ``"IoU 0.81  score 0.64"``)."""


def _tile(image: np.ndarray, caption: str, width: int, scale: float) -> np.ndarray:
    lines = wrap_text(caption, width - 16, scale, max_lines=2)
    lines += [""] * (2 - len(lines))  # equal caption heights keep the tiles of a row aligned
    return np.concatenate([text_band(lines, width, scale), fit_width(image, width)], axis=0)


def summary_sheet(
    rows: Sequence[tuple[str, Sequence[Tile], Sequence[Tile]]],
    *,
    tile_width: int = 440,
    title: str = "",
) -> np.ndarray:
    """A grid with one row per subset: its name, then its best tiles, a divider, then its worst tiles.

    ``rows``: (subset name, best tiles, worst tiles); pictures are fitted to ``tile_width`` under their
    caption. Returns (H, W, 3) uint8 RGB.
    """
    k_best = max((len(b) for _, b, _ in rows), default=0)
    k_worst = max((len(w) for _, _, w in rows), default=0)
    label_w, gap = 160, 10
    divider = label_w + k_best * (tile_width + gap) + gap // 2
    width = divider + gap + k_worst * (tile_width + gap) + gap
    scale = 0.7
    head = [title] if title else []
    head.append(
        f"per subset: the {k_best} best expressions by IoU (left of the bar), the {k_worst} worst (right)"
    )
    parts = [text_band(head, width, 0.8)]
    for name, best, worst in rows:
        tiles = [(label_w + i * (tile_width + gap), t) for i, t in enumerate(best)]
        tiles += [(divider + gap + i * (tile_width + gap), t) for i, t in enumerate(worst)]
        drawn = [(x, _tile(im, caption, tile_width, scale)) for x, (im, caption) in tiles]
        height = max((t.shape[0] for _, t in drawn), default=40)
        row = np.full((height + gap, width, 3), BAND_COLOUR, np.uint8)
        for i, line in enumerate(wrap_text(name, label_w - 20, 0.9, 2)):
            cv2.putText(row, line, (10, 34 + 34 * i), FONT, 0.9, TEXT_COLOUR, 2, cv2.LINE_AA)
        cv2.line(row, (divider, 0), (divider, height + gap), TEXT_COLOUR, 2)
        for x, tile in drawn:
            row[: tile.shape[0], x : x + tile.shape[1]] = tile
        parts.append(row)
    return np.concatenate(parts, axis=0)


def write_png(path, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG (OpenCV wants BGR)."""
    cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def scatter_panel(
    x: Sequence[float], y: Sequence[float], *, title: str, x_label: str, y_label: str, size: int = 420
) -> np.ndarray:
    """A square scatter plot of points in [0, 1]² with axes, ticks at 0/0.5/1, a title and labels.
    Returns (H, W, 3) uint8 RGB."""
    margin_l, margin_b, margin_t, margin_r = 64, 56, 40, 16
    h, w = size + margin_t + margin_b, size + margin_l + margin_r
    image = np.full((h, w, 3), 250, np.uint8)
    x0, y0 = margin_l, margin_t + size  # origin (bottom-left) in pixels
    cv2.rectangle(image, (x0, margin_t), (x0 + size, y0), (60, 60, 60), 1)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        px, py = x0 + round(t * size), y0 - round(t * size)
        cv2.line(image, (px, margin_t), (px, y0), (225, 225, 225), 1)
        cv2.line(image, (x0, py), (x0 + size, py), (225, 225, 225), 1)
        cv2.putText(image, f"{t:g}", (px - 10, y0 + 20), FONT, 0.5, (40, 40, 40), 1, cv2.LINE_AA)
        cv2.putText(image, f"{t:g}", (x0 - 40, py + 5), FONT, 0.5, (40, 40, 40), 1, cv2.LINE_AA)
    for a, b in zip(x, y):
        a, b = float(np.clip(a, 0, 1)), float(np.clip(b, 0, 1))
        cv2.circle(image, (x0 + round(a * size), y0 - round(b * size)), 4, (30, 90, 200), -1, cv2.LINE_AA)
    cv2.putText(image, title, (x0, margin_t - 14), FONT, 0.6, (20, 20, 20), 1, cv2.LINE_AA)
    cv2.putText(image, x_label, (x0 + size // 2 - 60, h - 14), FONT, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
    label = np.full((24, size, 3), 250, np.uint8)
    cv2.putText(label, y_label, (size // 2 - 50, 17), FONT, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
    image[margin_t : margin_t + size, 2:26] = np.rot90(label)
    return image
