"""Golden tests of the light-field reader: names, view order, exact round-trips, and every bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.errors import LightFieldError
from dataset.lightfield import LightFieldLayout, load_light_field, read_disparity, read_rgb
from utils.views import NEIGHBOURHOODS, parse_views

H, W = 12, 16


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def _scene(tmp_path: Path, names: list[str], disparity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write views ``names`` (e.g. "5_4") with distinct random pixels; return name -> RGB."""
    scene = tmp_path / "Image7"
    scene.mkdir()
    views = {}
    for i, name in enumerate(names):
        views[name] = _rgb(i)
        _write_rgb(scene / f"{name}.png", views[name])
    if disparity is not None:
        np.save(scene / "5_5_disparity.npy", disparity)
    return views


def test_neighbourhoods_offsets_and_order() -> None:
    assert NEIGHBOURHOODS["4"] == ((0, -1), (0, 1), (-1, 0), (1, 0))
    layout = LightFieldLayout()
    assert [layout.view_name(o) for o in NEIGHBOURHOODS["4"]] == ["5_4.png", "5_6.png", "4_5.png", "6_5.png"]
    assert NEIGHBOURHOODS["8"][:4] == NEIGHBOURHOODS["4"]
    assert set(NEIGHBOURHOODS["8"][4:]) == {(-1, -1), (-1, 1), (1, -1), (1, 1)}
    cross = NEIGHBOURHOODS["cross2"]
    assert len(cross) == 8 and cross[:4] == NEIGHBOURHOODS["4"]
    assert set(cross) == {(0, -1), (0, 1), (-1, 0), (1, 0), (0, -2), (0, 2), (-2, 0), (2, 0)}


def test_parse_views_names_and_lists() -> None:
    assert parse_views("4") == NEIGHBOURHOODS["4"]
    assert parse_views(" cross2 ") == NEIGHBOURHOODS["cross2"]
    assert parse_views("5_4,5_6,4_5,6_5") == NEIGHBOURHOODS["4"]
    assert parse_views("3_5, 5_7") == ((-2, 0), (0, 2))
    assert parse_views("1_1", LightFieldLayout(center=(2, 2))) == ((-1, -1),)


@pytest.mark.parametrize("spec", ["", "abc", "5-4", "5_4,", "5_5", "5_4,5_4", "0_5", "5_4;5_6"])
def test_parse_views_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="view spec"):
        parse_views(spec)


def test_layout_patterns() -> None:
    layout = LightFieldLayout(view_pattern="view_{row:02d}_{col:02d}.png", scene_pattern="S{image_id}")
    assert layout.view_name((0, -1)) == "view_05_04.png"
    assert layout.scene_name(12) == "S12"


def test_views_round_trip_exactly_in_requested_order(tmp_path: Path) -> None:
    disp = np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(H, W)
    views = _scene(tmp_path, ["5_5", "5_4", "5_6", "4_5", "6_5", "4_4"], disp)
    offsets = ((1, 0), (-1, -1), (0, -1))
    sample = load_light_field(tmp_path / "Image7", offsets)
    np.testing.assert_array_equal(sample.center, views["5_5"])
    assert sample.views.shape == (3, H, W, 3) and sample.views.dtype == np.uint8
    for got, name in zip(sample.views, ["6_5", "4_4", "5_4"]):
        np.testing.assert_array_equal(got, views[name])
    assert sample.offsets.dtype == np.int64
    np.testing.assert_array_equal(sample.offsets, np.array(offsets))
    assert sample.disparity.dtype == np.float32
    np.testing.assert_array_equal(sample.disparity, disp)
    assert sample.scene_dir == str(tmp_path / "Image7")


def test_no_views_and_no_disparity(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5"])
    sample = load_light_field(tmp_path / "Image7", (), with_disparity=False)
    assert sample.views.shape == (0, H, W, 3) and sample.offsets.shape == (0, 2)
    assert sample.disparity is None


def test_custom_layout_names(tmp_path: Path) -> None:
    scene = tmp_path / "S3"
    scene.mkdir()
    _write_rgb(scene / "view_2_2.png", _rgb(0))
    _write_rgb(scene / "view_2_3.png", _rgb(1))
    np.save(scene / "disparity_OAVC.npy", np.zeros((H, W), np.float64))
    layout = LightFieldLayout("view_{row}_{col}.png", "disparity_OAVC.npy", (2, 2), "S{image_id}")
    sample = load_light_field(tmp_path / layout.scene_name(3), parse_views("2_3", layout), layout)
    np.testing.assert_array_equal(sample.views[0], _rgb(1))
    assert sample.disparity.dtype == np.float32


def test_similar_name_never_stands_in(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5", "15_4", "5_6", "4_5", "6_5"], np.zeros((H, W), np.float32))
    with pytest.raises(LightFieldError, match="view file not found") as info:
        load_light_field(tmp_path / "Image7", NEIGHBOURHOODS["4"])
    assert Path(info.value.path).name == "5_4.png"


def test_missing_scene_dir(tmp_path: Path) -> None:
    with pytest.raises(LightFieldError, match="scene folder not found") as info:
        load_light_field(tmp_path / "Image99", NEIGHBOURHOODS["4"])
    assert info.value.path == str(tmp_path / "Image99")


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text"])
def test_corrupt_png_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "5_4.png"
    png = cv2.imencode(".png", _rgb(0))[1].tobytes()
    data = {
        "random": np.random.default_rng(1).bytes(300),
        "truncated": png[: len(png) // 2],
        "empty": b"",
        "text": b"not an image\n",
    }[kind]
    path.write_bytes(data)
    with pytest.raises(LightFieldError, match="cannot decode image") as info:
        read_rgb(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(str(path))


def test_grey_and_alpha_become_rgb(tmp_path: Path) -> None:
    grey = _rgb(0)[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(read_rgb(tmp_path / "g.png"), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.concatenate([_rgb(1), np.full((H, W, 1), 128, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "a.png"), rgba[..., [2, 1, 0, 3]])
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), rgba[..., :3])


def test_view_shape_mismatch_names_file_and_shapes(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5", "5_4"])
    _write_rgb(tmp_path / "Image7" / "5_6.png", np.zeros((H, W + 1, 3), np.uint8))
    with pytest.raises(LightFieldError, match=r"\(12, 17, 3\).*\(12, 16, 3\)") as info:
        load_light_field(tmp_path / "Image7", ((0, -1), (0, 1)), with_disparity=False)
    assert Path(info.value.path).name == "5_6.png"


def test_disparity_accepts_trailing_channel(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.ones((H, W, 1), np.float64))
    out = read_disparity(path, (H, W))
    assert out.shape == (H, W) and out.dtype == np.float32


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((H, W + 1), np.float32), r"shape \(12, 17\) does not match expected \(H, W\) \(12, 16\)"),
        (np.zeros((H, W, 2), np.float32), r"must be \(H, W\), got shape \(12, 16, 2\)"),
        (np.zeros((H,), np.float32), r"must be \(H, W\), got shape \(12,\)"),
        (np.array([["a"] * W] * H), "numeric"),
    ],
)
def test_disparity_bad_shape_or_dtype(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "d.npy"
    np.save(path, array)
    with pytest.raises(LightFieldError, match=message) as info:
        read_disparity(path, (H, W))
    assert info.value.path == str(path)


def test_disparity_non_finite_values_are_counted(tmp_path: Path) -> None:
    disp = np.zeros((H, W), np.float32)
    disp[0, :3] = np.nan
    disp[1, 0] = np.inf
    disp[2, 0] = -np.inf
    np.save(tmp_path / "d.npy", disp)
    with pytest.raises(LightFieldError, match="3 NaN and 2 ±inf"):
        read_disparity(tmp_path / "d.npy", (H, W))


def test_disparity_missing_corrupt_or_pickled(tmp_path: Path) -> None:
    with pytest.raises(LightFieldError, match="disparity file not found"):
        read_disparity(tmp_path / "none.npy")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(LightFieldError, match="cannot read disparity") as info:
        read_disparity(tmp_path / "bad.npy")
    assert info.value.path == str(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LightFieldError, match="cannot read disparity"):
        read_disparity(tmp_path / "obj.npy")


def test_missing_disparity_in_scene(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5"])
    with pytest.raises(LightFieldError, match="disparity file not found") as info:
        load_light_field(tmp_path / "Image7", ())
    assert Path(info.value.path).name == "5_5_disparity.npy"


def test_missing_neighbour_view_is_named(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5", "5_4", "4_5", "6_5"], np.zeros((H, W), np.float32))
    with pytest.raises(LightFieldError, match=r"5_6\.png: view file not found") as info:
        load_light_field(tmp_path / "Image7", NEIGHBOURHOODS["4"])
    assert info.value.path == str(tmp_path / "Image7" / "5_6.png")


def test_unreadable_view_is_named(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_5"], np.zeros((H, W), np.float32))
    (tmp_path / "Image7" / "5_4.png").mkdir()  # a folder where the file should be
    with pytest.raises(LightFieldError, match="cannot read view file") as info:
        load_light_field(tmp_path / "Image7", ((0, -1),))
    assert info.value.path == str(tmp_path / "Image7" / "5_4.png")


def test_corrupt_centre_view_in_scene_is_named(tmp_path: Path) -> None:
    _scene(tmp_path, ["5_4"], np.zeros((H, W), np.float32))
    (tmp_path / "Image7" / "5_5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(LightFieldError, match="cannot decode image") as info:
        load_light_field(tmp_path / "Image7", ((0, -1),))
    assert Path(info.value.path).name == "5_5.png"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((H + 1, W), np.float32), r"shape \(13, 16\) does not match expected \(H, W\) \(12, 16\)"),
        (np.full((H, W), np.nan, np.float32), f"{H * W} NaN and 0 ±inf"),
    ],
)
def test_bad_disparity_in_scene_is_named(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    """The scene loader checks the disparity against the centre view's (H, W) and for finite values."""
    _scene(tmp_path, ["5_5", "5_4"], bad)
    with pytest.raises(LightFieldError, match=message) as info:
        load_light_field(tmp_path / "Image7", ((0, -1),))
    assert info.value.path == str(tmp_path / "Image7" / "5_5_disparity.npy")


def test_disparity_npz_or_complex_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "5_5_disparity.npy"
    with path.open("wb") as fh:  # an .npz archive under a .npy name
        np.savez(fh, disparity=np.zeros((H, W), np.float32))
    with pytest.raises(LightFieldError, match=r"single \.npy array, got NpzFile") as info:
        read_disparity(path, (H, W))
    assert info.value.path == str(path)
    np.save(path, np.zeros((H, W), np.complex64))
    with pytest.raises(LightFieldError, match="real numeric array, got dtype complex64"):
        read_disparity(path, (H, W))
