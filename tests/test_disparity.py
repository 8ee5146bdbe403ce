"""Tests of the classical light-field disparity estimator (model/disparity.py) and its scripts.

Scenes are rendered in closed form with the UrbanLF convention: view ``(drow, dcol)`` shows at ``(x, y)`` the
centre-view point ``(x + d*dcol, y + d*drow)`` of the front-most layer. Sizes are small (CPU, 2 cores).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.disparity.config import DisparityConfig
from dataset.disparity.cost_volume import direction_groups
from dataset.disparity.estimator import block_matching_baseline, disparity_for_scene, estimate_disparity
from dataset.errors import LightFieldError
from dataset.lightfield import LightFieldLayout
from dataset.synthetic import SyntheticConfig, render_scene, write_dataset
from utils.views import view_set_offsets

ROOT = Path(__file__).resolve().parents[1]
CROSS = view_set_offsets("cross")  # 16 neighbours of the 9x9 grid
FAST = DisparityConfig(num_planes=31)  # 0.1 px planes: exercises the sub-pixel refinement


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def texture(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth random RGB texture in [0, 1] at float coordinates (broadcast x, y) -> (3, *shape)."""
    rng = np.random.default_rng(seed)
    out = []
    base = rng.uniform(0.3, 0.7, 3)
    waves = [(rng.uniform(5, 16), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)) for _ in range(6)]
    for c in range(3):
        value = np.full(np.broadcast_shapes(x.shape, y.shape), base[c])
        for k, (period, theta, phase) in enumerate(waves):
            amp = 0.06 * (1.0 + 0.3 * ((c + k) % 3))
            value = value + amp * np.sin(
                2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + phase
            )
        out.append(value)
    return np.clip(np.stack(out), 0.0, 1.0)


def render_layers(
    h: int,
    w: int,
    offsets,
    bg_d: float,
    fg_d: float | None = None,
    box=(0, 0, 0, 0),
    bg_contrast: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Background plane at ``bg_d`` and optionally a square ``box = (x0, y0, x1, y1)`` at ``fg_d``.

    ``bg_contrast`` scales the background texture around grey 0.5. Returns views ``(1, N, 3, H, W)``
    float (uint8-quantised, centre first), offsets ``(N, 2)`` (centre first) and the GT ``(H, W)``.
    """
    offs = [(0, 0), *offsets]
    xs, ys = np.arange(w, dtype=np.float64)[None], np.arange(h, dtype=np.float64)[:, None]
    views = []
    for dr, dc in offs:
        img = 0.5 + bg_contrast * (texture(xs + bg_d * dc, ys + bg_d * dr, seed=1) - 0.5)
        if fg_d is not None:
            u, v = xs + fg_d * dc, ys + fg_d * dr
            inside = (u >= box[0]) & (u < box[2]) & (v >= box[1]) & (v < box[3])
            img = np.where(inside[None], texture(u, v, seed=2) * 0.6 + 0.3, img)
        views.append(np.rint(img * 255) / 255)
    gt = np.full((h, w), bg_d, np.float32)
    if fg_d is not None:
        gt[box[1] : box[3], box[0] : box[2]] = fg_d
    return torch.tensor(np.stack(views), dtype=torch.float32)[None], torch.tensor(offs), gt


def metrics(est: np.ndarray, gt: np.ndarray, border: int) -> tuple[float, float]:
    err = (est - gt)[border:-border, border:-border]
    return float(100 * np.mean(err**2)), float(100 * np.mean(np.abs(err) > 0.07))


def _box_distance(h: int, w: int, box) -> np.ndarray:
    """Chebyshev distance (px) of every pixel to the edge of ``box``: > 0 outside, < 0 inside."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.maximum(np.maximum(box[0] - xs, xs - (box[2] - 1)), np.maximum(box[1] - ys, ys - (box[3] - 1)))


def test_view_sets_and_groups() -> None:
    assert len(CROSS) == 16 and (0, -4) in CROSS and (4, 0) in CROSS and (0, 0) not in CROSS
    full = view_set_offsets("full")
    assert len(full) == 80 and len(set(full)) == 80 and (0, 0) not in full
    assert view_set_offsets("5_4,5_6") == ((0, -1), (0, 1))
    groups = direction_groups(torch.tensor([(0, -1), (0, 2), (-1, -1), (3, 0)]))  # left, right, up, down
    assert groups.tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    with pytest.raises(ValueError, match="bogus"):
        view_set_offsets("bogus")


def test_sweep_samples_neighbour_at_x_minus_d_dcol() -> None:
    from dataset.disparity.cost_volume import sample_grid as _sample_grid
    from dataset.disparity.cost_volume import warp_planes as _warp_planes

    img = torch.rand(1, 1, 3, 10, 12)  # (B, V, C, H, W): one neighbour at (drow, dcol) = (1, 2)
    grid, valid = _sample_grid(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.5]), 10, 12)
    out = _warp_planes(img, grid)  # (B, V, C, P, H, W)
    # d = 1: centre pixel (x, y) is compared with the view at (x - 2, y - 1)
    torch.testing.assert_close(out[0, 0, :, 0, 1:, 2:], img[0, 0, :, :-1, :-2])
    assert (
        bool(valid[0, 0, 1:, 2:].all())
        and not bool(valid[0, 0, 0].any())
        and not bool(valid[0, 0, :, :2].any())
    )
    # d = 0.5: (x - 1, y - 0.5), bilinear between rows y - 1 and y
    expected = 0.5 * (img[0, 0, :, :-1, :-1] + img[0, 0, :, 1:, :-1])
    torch.testing.assert_close(out[0, 0, :, 1, 1:, 1:], expected)
    assert bool(valid[0, 1, 1:, 1:].all()) and not bool(valid[0, 1, 0].any())


@pytest.mark.parametrize("d", [0.47, -0.7])
def test_fronto_parallel_plane_recovered_subpixel(d: float) -> None:
    h, w = 40, 56
    views, offsets, gt = render_layers(h, w, CROSS, bg_d=d)
    coarse = DisparityConfig(num_planes=16)  # 0.2 px planes: the nearest plane is 0.07 / 0.1 px away
    est = estimate_disparity(views, offsets, 0, coarse)
    assert est.shape == (1, h, w) and est.dtype == torch.float32
    err = (est[0] - torch.from_numpy(gt)).abs()[8:-8, 8:-8]
    assert err.max().item() < 0.05, err.max().item()
    # without the parabola fit the plane spacing shows; the mirrored disparity is nowhere near
    wta = estimate_disparity(views, offsets, 0, coarse, subpixel=False)[0, 8:-8, 8:-8]
    assert (wta - d).abs().min().item() > 0.05
    assert (est[0, 8:-8, 8:-8] + d).abs().min().item() > 0.5


def test_two_layers_right_away_from_occlusion_boundary() -> None:
    h, w = 56, 72
    box = (24, 16, 48, 40)
    views, offsets, gt = render_layers(h, w, CROSS, bg_d=-0.3, fg_d=1.2, box=box)
    est = estimate_disparity(views, offsets, 0, FAST)[0].numpy()
    ys, xs = np.mgrid[0:h, 0:w]
    dist_box = _box_distance(h, w, box)
    far = (np.abs(dist_box) > 6) & (xs >= 8) & (xs < w - 8) & (ys >= 8) & (ys < h - 8)
    for name, layer in (("foreground", dist_box < 0), ("background", dist_box > 0)):
        err = np.abs(est - gt)[far & layer]
        assert err.size > 50
        assert np.median(err) < 0.03, (name, np.median(err))
        assert np.mean(err < 0.1) > 0.97, (name, np.mean(err < 0.1))


def test_occlusion_robust_combination_keeps_background_next_to_occluder() -> None:
    # a faint background (a few grey levels of texture) next to a strongly textured occluder 2 px nearer:
    # the views on the occluder's side see it instead of the background within ~8 px of its edge
    h, w, box = 64, 80, (28, 20, 52, 44)
    views, offsets, gt = render_layers(h, w, CROSS, bg_d=-0.4, fg_d=1.6, box=box, bg_contrast=0.03)
    dist = _box_distance(h, w, box)
    band = (dist >= 1) & (dist <= 4)  # background pixels 1-4 px from the occluder
    assert band.sum() > 300
    bad = {
        mode: float(
            np.mean(
                np.abs(estimate_disparity(views, offsets, 0, occlusion=mode)[0].numpy() - gt)[band] > 0.07
            )
        )
        for mode in ("axis", "none")
    }
    assert bad["axis"] < 0.1, bad
    assert bad["none"] > 0.3, bad  # plain averaging fattens the occluder: the scene does test occlusion


def test_batched_chunked_and_uint8_inputs_agree() -> None:
    h, w = 24, 32
    a, offsets, _ = render_layers(h, w, CROSS, bg_d=0.4)
    b, _, _ = render_layers(h, w, CROSS, bg_d=-0.2, fg_d=0.9, box=(8, 6, 20, 16))
    views = torch.cat([a, b])
    cfg = DisparityConfig(num_planes=13, median=1)
    batched = estimate_disparity(views, offsets, 0, cfg)
    single = torch.stack([estimate_disparity(v[None], offsets, 0, cfg)[0] for v in views])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    tiny_chunks = estimate_disparity(views, offsets, 0, cfg, chunk_mb=0.01)  # one plane and one view per step
    torch.testing.assert_close(tiny_chunks, batched, atol=1e-5, rtol=0)
    as_uint8 = estimate_disparity((views * 255).round().to(torch.uint8), offsets, 0, cfg)
    torch.testing.assert_close(as_uint8, batched, atol=1e-4, rtol=0)
    # the centre may sit anywhere in the stack
    perm = [3, 0, *range(1, 3), *range(4, views.shape[1])]
    moved = estimate_disparity(views[:, perm], offsets[perm], 1, cfg)
    torch.testing.assert_close(moved, batched, atol=1e-5, rtol=0)


def test_tensor_input_errors_name_the_problem() -> None:
    views, offsets, _ = render_layers(16, 20, [(0, -1), (0, 1)], bg_d=0.2)
    with pytest.raises(ValueError, match=r"offsets: expected shape \(3, 2\)"):
        estimate_disparity(views, torch.zeros(3, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"offsets: expected shape \(3, 2\)"):
        estimate_disparity(views, offsets[:2], 0)
    with pytest.raises(ValueError, match="integer"):
        estimate_disparity(views, offsets.float(), 0)
    with pytest.raises(ValueError, match=r"centre view.*must be \(0, 0\)"):
        estimate_disparity(views, offsets, 1)  # index 1 is 5_4, not the centre
    no_centre = torch.tensor([(0, 2), (0, -1), (0, 1)])
    with pytest.raises(ValueError, match="centre"):
        estimate_disparity(views, no_centre, 0)
    with pytest.raises(ValueError, match=r"views: expected shape \(B, N, 3, H, W\)"):
        estimate_disparity(views[0], offsets, 0)
    with pytest.raises(ValueError, match="at least one neighbour"):
        estimate_disparity(views[:, :1], offsets[:1], 0)
    with pytest.raises(ValueError, match="duplicate"):
        estimate_disparity(views, torch.tensor([(0, 0), (0, 1), (0, 1)]), 0)
    with pytest.raises(ValueError, match="d_min < d_max"):
        estimate_disparity(views, offsets, 0, d_min=1.0, d_max=0.5)
    with pytest.raises(TypeError):
        estimate_disparity(views, offsets, 0, no_such_option=1)


def _write_scene(folder: Path, size_of: dict[str, tuple[int, int]] | None = None, skip=()) -> Path:
    """A tiny 3x3-grid scene (centre 2_2) of a textured plane as PNG files."""
    folder.mkdir(parents=True)
    offs = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    views, _, _ = render_layers(20, 24, [o for o in offs if o != (0, 0)], bg_d=0.3)
    for (dr, dc), img in zip([(0, 0), *[o for o in offs if o != (0, 0)]], views[0]):
        name = f"{2 + dr}_{2 + dc}.png"
        if name in skip:
            continue
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[:, :, ::-1]
        if size_of and name in size_of:
            arr = cv2.resize(arr, size_of[name])
        cv2.imwrite(str(folder / name), arr)
    return folder


def test_file_input_errors_name_the_file(tmp_path: Path) -> None:
    layout = LightFieldLayout(center=(2, 2))
    cfg = DisparityConfig(views="full", num_planes=11)  # the 8 neighbours of a 3x3 grid
    ok = disparity_for_scene(_write_scene(tmp_path / "ok"), layout, cfg)
    assert ok.shape == (20, 24) and ok.dtype == np.float32
    with pytest.raises(LightFieldError, match=r"2_2\.png.*not found"):
        disparity_for_scene(_write_scene(tmp_path / "nocentre", skip={"2_2.png"}), layout, cfg)
    with pytest.raises(LightFieldError, match=r"1_3\.png.*shape"):
        disparity_for_scene(_write_scene(tmp_path / "sizes", size_of={"1_3.png": (30, 20)}), layout, cfg)
    with pytest.raises(LightFieldError, match=r"3_1\.png.*not found"):
        disparity_for_scene(_write_scene(tmp_path / "noview", skip={"3_1.png"}), layout, cfg)


@pytest.fixture(scope="module")
def tiny_lf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disp_data")
    write_dataset(root, SyntheticConfig(height=32, width=40, num_train=1, num_val=1, seed=5))
    return root


def test_estimate_script_writes_and_skips(tiny_lf: Path, monkeypatch, capsys) -> None:
    script = importlib.import_module("dataset.disparity.cli")
    lf_root = tiny_lf / "lf" / "ref-urbanlf-syn"
    common = ["--lf_root", str(lf_root), "--views", "4", "--num_planes", "16", "--threads", "1"]
    assert script.main(common) == 0
    scenes = sorted(p.name for p in lf_root.iterdir())
    assert scenes == ["Image1", "Image2"]
    for scene in scenes:
        names = sorted(p.name for p in (lf_root / scene).iterdir() if not p.name.endswith(".png"))
        assert names == ["5_5_disparity.npy", "5_5_disparity_est.npy"]  # no temporary files left
        est = np.load(lf_root / scene / "5_5_disparity_est.npy")
        assert est.shape == (32, 40) and est.dtype == np.float32 and np.isfinite(est).all()
    first = np.load(lf_root / "Image1" / "5_5_disparity_est.npy")

    calls: list[Path] = []

    def fake(scene_dir, layout, config, device="cpu"):
        calls.append(Path(scene_dir))
        return np.full((32, 40), 7.0, np.float32)

    monkeypatch.setattr(script, "disparity_for_scene", fake)
    assert script.main(common) == 0
    assert calls == [] and "skipped 2" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(lf_root / "Image1" / "5_5_disparity_est.npy"), first)
    (lf_root / "Image2" / "5_5_disparity_est.npy").unlink()
    assert script.main(common) == 0
    assert [p.name for p in calls] == ["Image2"]
    assert np.load(lf_root / "Image2" / "5_5_disparity_est.npy")[0, 0] == 7.0
    assert script.main([*common, "--overwrite", "--out_name", "d.npy"]) == 0
    assert [p.name for p in calls] == ["Image2", "Image1", "Image2"]
    assert (lf_root / "Image1" / "d.npy").is_file()
    assert script.main(["--lf_root", str(tiny_lf / "missing")]) == 2
    assert script.main([*common, "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_eval_script_scores_ours_and_baseline(tiny_lf: Path, tmp_path: Path, capsys) -> None:
    script = importlib.import_module("dataset.disparity.evaluate")
    out = tmp_path / "eval.json"
    argv = ["--dataset_dir", str(tiny_lf), "--ds", "ref-urbanlf-syn", "--border", "4", "--threads", "1"]
    assert script.main([*argv, "--views", "4", "--set", "median=3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "MSE x100" in table and "baseline" in table
    result = json.loads(out.read_text())
    assert result["num_scenes"] == 2 and result["num_views"] == 5
    assert result["settings"]["config"]["median"] == 3
    for method in ("ours", "baseline"):
        mean = result["mean"][method]
        assert 0.0 <= mean["badpix"] <= 100.0 and mean["mse_x100"] >= 0.0
    gt = np.load(tiny_lf / "lf" / "ref-urbanlf-syn" / "Image1" / "5_5_disparity.npy")
    assert script.disparity_metrics(gt + 0.1, gt, border=4)["badpix"] == 100.0
    assert script.disparity_metrics(gt, gt, border=4) == {"mse_x100": 0.0, "badpix": 0.0}
    assert script.disparity_metrics(gt + 0.05, gt, border=4)["mse_x100"] == pytest.approx(0.25, rel=1e-4)


def test_beats_block_matching_baseline_on_synthetic_scene() -> None:
    cfg = SyntheticConfig(height=96, width=128, num_train=0, num_val=1, seed=11)
    offsets = [(0, 0), *CROSS]
    scene = render_scene(1, cfg, views=[(5 + dr, 5 + dc) for dr, dc in offsets])

    def tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(img).permute(2, 0, 1).float() / 255

    views = torch.stack([tensor(scene.views[(5 + dr, 5 + dc)]) for dr, dc in offsets])[None]
    center = views[:, 0]
    ours = estimate_disparity(views, torch.tensor(offsets), 0)[0].numpy()
    base = block_matching_baseline(center, tensor(scene.views[(5, 6)])[None], (0, 1))[0].numpy()
    mse_ours, bad_ours = metrics(ours, scene.disparity, 8)
    mse_base, bad_base = metrics(base, scene.disparity, 8)
    assert mse_ours < 0.5 * mse_base, (mse_ours, mse_base)
    assert bad_ours < 0.5 * bad_base, (bad_ours, bad_base)
