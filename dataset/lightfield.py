"""Read the sub-aperture views and the centre disparity of one light-field scene (UrbanLF layout).

A scene is a folder (``Image<image_id>/`` by default) holding a grid of views named ``<row>_<col>.png``
(1-based, centre ``5_5`` in a 9×9 grid) and the centre-view disparity ``5_5_disparity.npy``. Every name
comes from :class:`LightFieldLayout`; nothing else in the code base spells them out.

Geometry convention (UrbanLF / OAVC, and the one our synthetic generator renders with): a point at
``(x, y)`` in the centre view appears in view ``(row, col)`` at

    (x − d·(col − 5), y − d·(row − 5)),

where ``d`` is the centre disparity at ``(x, y)`` in pixels between adjacent views; larger ``d`` means
nearer to the camera. Neighbours are addressed by their offset ``(drow, dcol) = (row − 5, col − 5)``
from the centre, so ``5_4`` (left of the centre) is ``(0, -1)`` and ``4_5`` (above it) is ``(-1, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dataset.errors import LightFieldError
from dataset.options import DEFAULT_DATA_OPTIONS
from utils.views import NEIGHBOURHOODS, Offset, parse_views

__all__ = [
    "DEFAULT_LAYOUT",
    "NEIGHBOURHOODS",
    "LightFieldLayout",
    "LightFieldSample",
    "Offset",
    "load_light_field",
    "parse_views",
    "read_disparity",
    "read_rgb",
]


@dataclass(frozen=True)
class LightFieldLayout:
    """File names of one scene. Patterns are ``str.format`` templates.

    ``view_pattern`` receives ``row`` and ``col`` (1-based), ``scene_pattern`` receives ``image_id``;
    ``disparity_name`` may point at an estimated map such as ``5_5_disparity_OAVC.npy``.
    """

    view_pattern: str = DEFAULT_DATA_OPTIONS.view_pattern
    disparity_name: str = DEFAULT_DATA_OPTIONS.disparity_name
    center: Offset = (5, 5)
    scene_pattern: str = "Image{image_id}"

    def view_name(self, offset: Offset) -> str:
        """File name of the view at ``offset = (drow, dcol)`` from the centre."""
        return self.view_pattern.format(row=self.center[0] + offset[0], col=self.center[1] + offset[1])

    def scene_name(self, image_id: int | str) -> str:
        """Folder name of the scene of ``image_id``."""
        return self.scene_pattern.format(image_id=image_id)


#: The UrbanLF layout (9×9 views ``<row>_<col>.png``, centre ``5_5``, ``5_5_disparity.npy``).
DEFAULT_LAYOUT = LightFieldLayout()


@dataclass
class LightFieldSample:
    """One scene as arrays.

    Attributes:
        center: (H, W, 3) uint8 RGB centre view.
        views: (V, H, W, 3) uint8 RGB neighbour views, in the requested order (V may be 0).
        offsets: (V, 2) int64 ``(drow, dcol)`` of each neighbour.
        disparity: (H, W) float32 centre disparity in px between adjacent views, or None.
        scene_dir: the scene folder.
    """

    center: np.ndarray
    views: np.ndarray
    offsets: np.ndarray
    disparity: np.ndarray | None
    scene_dir: str


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (grey and alpha images become 3-channel RGB).

    Raises ``LightFieldError`` naming the file when it is missing, unreadable or not a decodable image.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError:
        raise LightFieldError(path, "view file not found") from None
    except OSError as exc:
        raise LightFieldError(path, f"cannot read view file ({exc.strerror or exc})") from None
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV decodes
        raise LightFieldError(path, f"cannot decode image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise LightFieldError(path, "cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


#: Largest |disparity| accepted, in px between adjacent views. Light fields have small baselines
#: (UrbanLF-Syn GT spans about [-0.47, 1.55] px, Lytro captures a few px); a map beyond this is almost
#: surely in other units (depth in mm, a stereo-pair disparity, an 8/16-bit encoded image).
MAX_ABS_DISPARITY_PX = 32.0


def check_disparity_values(array: np.ndarray) -> None:
    """Raise ``ValueError`` when ``array`` is not a plausible disparity map of the documented convention:
    a real float dtype (an integer map is in other units), finite, |d| <= :data:`MAX_ABS_DISPARITY_PX`."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"disparity must be a real numeric array, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"disparity has integer dtype {array.dtype}: expected float px between adjacent views "
            "(larger = nearer); a depth or encoded map must be converted first (docs/DATA.md)"
        )
    values = np.asarray(array, dtype=np.float32)
    n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"disparity has {n_nan} NaN and {n_inf} ±inf values of {values.size}; must be finite"
        )
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > MAX_ABS_DISPARITY_PX:
        raise ValueError(
            f"|disparity| reaches {peak:.4g} px, beyond the plausible {MAX_ABS_DISPARITY_PX:g} px between "
            "adjacent views: is the map in other units (depth, mm, a stereo pair's disparity)?"
        )


def read_disparity(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Load a centre-view disparity map as (H, W) float32 (an (H, W, 1) array is squeezed).

    Raises ``LightFieldError`` naming the file when it is missing or unreadable, when its shape is not
    ``expected_hw``, or when its values are not a plausible disparity (:func:`check_disparity_values`:
    an integer dtype, NaN / ±inf, or |d| beyond :data:`MAX_ABS_DISPARITY_PX`).
    """
    try:
        array = np.load(str(path), allow_pickle=False)
    except FileNotFoundError:
        raise LightFieldError(path, "disparity file not found") from None
    except (OSError, ValueError, EOFError) as exc:
        raise LightFieldError(path, f"cannot read disparity as a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive saved under a .npy name
        getattr(array, "close", lambda: None)()
        raise LightFieldError(path, f"disparity must be a single .npy array, got {type(array).__name__}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise LightFieldError(path, f"disparity must be a real numeric array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise LightFieldError(path, f"disparity must be (H, W), got shape {tuple(array.shape)}")
    if expected_hw is not None and tuple(array.shape) != tuple(expected_hw):
        raise LightFieldError(
            path, f"disparity shape {tuple(array.shape)} does not match expected (H, W) {tuple(expected_hw)}"
        )
    try:
        check_disparity_values(array)
    except ValueError as exc:
        raise LightFieldError(path, str(exc)) from None
    return np.ascontiguousarray(array, dtype=np.float32)


def load_light_field(
    scene_dir: str | Path,
    offsets: tuple[Offset, ...] | list[Offset],
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    with_disparity: bool = True,
) -> LightFieldSample:
    """Load the centre view, the neighbours at ``offsets`` (in that order) and the centre disparity.

    File names are built from ``layout`` exactly (no directory listing, so ``15_4.png`` never stands in
    for ``5_4.png``). Every view and the disparity must have the centre's (H, W).

    Returns:
        :class:`LightFieldSample` with center (H, W, 3), views (V, H, W, 3), offsets (V, 2),
        disparity (H, W) or None.
    """
    scene = Path(scene_dir)
    if not scene.is_dir():
        raise LightFieldError(scene, "light-field scene folder not found")
    center = read_rgb(scene / layout.view_name((0, 0)))
    height, width = center.shape[:2]
    views = np.empty((len(offsets), height, width, 3), dtype=np.uint8)
    for i, offset in enumerate(offsets):
        path = scene / layout.view_name(tuple(offset))
        view = read_rgb(path)
        if view.shape != center.shape:
            raise LightFieldError(
                path,
                f"view shape {view.shape} differs from centre view "
                f"{layout.view_name((0, 0))} shape {center.shape}",
            )
        views[i] = view
    disparity = None
    if with_disparity:
        disparity = read_disparity(scene / layout.disparity_name, (height, width))
    return LightFieldSample(
        center=center,
        views=views,
        offsets=np.asarray(offsets, dtype=np.int64).reshape(len(offsets), 2),
        disparity=disparity,
        scene_dir=str(scene),
    )
