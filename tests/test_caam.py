"""Golden tests of the CAAM warp geometry and aggregation modes (model/caam.py)."""

from __future__ import annotations

import math

import pytest
import torch

from model.caam import (
    CAAM,
    DEFAULT_NEIGHBOUR_OFFSETS,
    clear_grid_cache,
    grid_cache_info,
    offsets_from_view_names,
    rescale_disparity,
    warp_to_center,
)

OFFSETS = torch.tensor(DEFAULT_NEIGHBOUR_OFFSETS)  # 5_4, 5_6, 4_5, 6_5


def smooth_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form smooth RGB image in [0, 1] at float coordinates; returns (3, H, W)."""
    two_pi = 2.0 * math.pi
    channels = [
        0.5 + 0.2 * torch.sin(two_pi * x / 64 + 0.3) + 0.2 * torch.cos(two_pi * y / 80 + 1.1),
        0.5 + 0.2 * torch.sin(two_pi * (x + y) / 96) + 0.1 * torch.cos(two_pi * x / 72),
        0.5 + 0.25 * torch.cos(two_pi * (x - 0.5 * y) / 88 + 0.7),
    ]
    return torch.stack(channels)


def render_views(
    h: int, w: int, disparity: float, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (3, H, W) and views (V, 3, H, W) of a fronto-parallel plane: view(x) = centre(x + d*dcol)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    center = smooth_image(xs, ys)
    views = [smooth_image(xs + disparity * dc, ys + disparity * dr) for dr, dc in offsets.tolist()]
    return center.float(), torch.stack(views).float()


def test_constant_disparity_smooth_image_warps_back_to_centre() -> None:
    h, w, d = 48, 64, 1.37
    center, views = render_views(h, w, d, OFFSETS)
    disp = torch.full((1, h, w), d)
    warped, valid = warp_to_center(views[None], disp, OFFSETS)
    margin = math.ceil(d) + 1
    interior = (slice(margin, h - margin), slice(margin, w - margin))
    err = (warped[0] - center[None]).abs()[..., interior[0], interior[1]]
    assert err.max().item() < 1e-3
    assert valid[0, :, :, interior[0], interior[1]].all()


def test_linear_ramp_is_exact_under_bilinear_warp() -> None:
    h, w, d = 20, 30, 0.73
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    ramp = lambda x, y: (0.01 * x + 0.02 * y)[None]  # noqa: E731
    views = torch.stack([ramp(xs + d * dc, ys + d * dr) for dr, dc in OFFSETS.tolist()])
    warped, valid = warp_to_center(views[None], torch.full((1, h, w), d), OFFSETS)
    err = (warped[0] - ramp(xs, ys)[None]).abs()[valid[0]]
    assert err.max().item() < 1e-5


def test_sign_convention_right_neighbour() -> None:
    """A bright dot at centre x=10 with d=2 sits at x=8 in view 5_6 and at x=12 in view 5_4."""
    h, w, d = 5, 20, 2.0
    views = torch.zeros(1, 2, 1, h, w)
    views[0, 0, 0, 2, 8] = 1.0  # view 5_6 (dcol = +1): x - d
    views[0, 1, 0, 2, 12] = 1.0  # view 5_4 (dcol = -1): x + d
    offsets = torch.tensor(offsets_from_view_names(["5_6", "5_4"]))
    assert offsets.tolist() == [[0, 1], [0, -1]]
    warped, _ = warp_to_center(views, torch.full((1, h, w), d), offsets)
    for v in range(2):
        assert warped[0, v, 0].argmax().item() == 2 * w + 10
        assert warped[0, v, 0, 2, 10].item() == pytest.approx(1.0, abs=1e-5)


def test_integer_disparity_is_exact_pixel_shift() -> None:
    torch.manual_seed(0)
    h, w, d = 12, 16, 3
    views = torch.rand(2, 4, 3, h, w)
    warped, valid = warp_to_center(views, torch.full((2, h, w), float(d)), OFFSETS)
    # 5_4 (dcol=-1): sampled at x + d; 5_6: x - d; 4_5 (drow=-1): y + d; 6_5: y - d.
    torch.testing.assert_close(warped[:, 0, :, :, : w - d], views[:, 0, :, :, d:], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[:, 1, :, :, d:], views[:, 1, :, :, : w - d], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[:, 2, :, : h - d], views[:, 2, :, d:], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[:, 3, :, d:], views[:, 3, :, : h - d], atol=1e-5, rtol=0)
    assert valid.shape == (2, 4, 1, h, w) and valid.dtype == torch.bool


def test_out_of_bounds_mask_at_borders() -> None:
    h, w, d = 10, 12, 2.0
    _, valid = warp_to_center(torch.ones(1, 4, 1, h, w), torch.full((1, h, w), d), OFFSETS)
    cols, rows = torch.arange(w), torch.arange(h)[:, None]
    expected = [
        (cols <= w - 3).expand(h, w),  # 5_4 reads x + 2
        (cols >= 2).expand(h, w),  # 5_6 reads x - 2
        (rows <= h - 3).expand(h, w),  # 4_5 reads y + 2
        (rows >= 2).expand(h, w),  # 6_5 reads y - 2
    ]
    for v in range(4):
        assert torch.equal(valid[0, v, 0], expected[v])
    # A fractional sample past the border (x_src = -0.5) is invalid too.
    _, valid_half = warp_to_center(torch.ones(1, 1, 1, h, w), torch.full((1, h, w), 0.5), OFFSETS[1:2])
    assert not valid_half[0, 0, 0, :, 0].any() and valid_half[0, 0, 0, :, 1:].all()


def test_non_finite_disparity_is_invalid() -> None:
    disp = torch.zeros(1, 4, 4)
    disp[0, 1, 1] = float("inf")
    disp[0, 2, 2] = float("nan")
    warped, valid = warp_to_center(torch.ones(1, 4, 1, 4, 4), disp, OFFSETS)
    assert not valid[0, :, 0, 1, 1].any() and not valid[0, :, 0, 2, 2].any()
    assert valid.sum().item() == 4 * 14 and torch.isfinite(warped).all()


def test_rescale_disparity_scale_xy() -> None:
    disp = torch.full((1, 8, 10), 2.0)
    resized, scale_xy = rescale_disparity(disp, (8, 10), (4, 20))
    assert resized.shape == (1, 4, 20) and scale_xy == (2.0, 0.5)
    assert torch.allclose(resized, torch.full_like(resized, 2.0))
    # Anisotropic: x shift = d*sx*dcol = 4 px, y shift = d*sy*drow = 1 px.
    views = torch.rand(1, 2, 1, 4, 20)
    offsets = torch.tensor([[0, 1], [1, 0]])
    warped, _ = warp_to_center(views, resized, offsets, scale_xy=scale_xy)
    torch.testing.assert_close(warped[0, 0, 0, :, 4:], views[0, 0, 0, :, :-4], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[0, 1, 0, 1:], views[0, 1, 0, :-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected shape"):
        rescale_disparity(disp, (9, 10), (4, 20))


def test_fixed_mode_weights_and_border_renormalisation() -> None:
    h, w = 6, 7
    caam = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="fixed")
    assert caam.view_weights().tolist() == pytest.approx([0.6, 0.1, 0.1, 0.1, 0.1])
    center = torch.full((1, 1, h, w), 1.0)
    views = torch.tensor([2.0, 3.0, 4.0, 5.0]).view(1, 4, 1, 1, 1).expand(1, 4, 1, h, w)
    out = caam(center, views, torch.zeros(1, h, w))
    assert torch.allclose(out, torch.full_like(out, 0.6 + 0.1 * 14), atol=1e-6)
    # d = 1: at x = 0 view 5_6 (value 3) is out of view -> renormalise over the other four.
    out = caam(center, views, torch.ones(1, h, w))
    assert out[0, 0, 3, 0].item() == pytest.approx((0.6 + 0.1 * (2 + 4 + 5)) / 0.9, abs=1e-6)
    # All views equal: borders are not darkened anywhere.
    ones = torch.ones(1, 4, 3, h, w)
    out = caam(torch.ones(1, 3, h, w), ones, torch.full((1, h, w), 2.5))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)


def test_learned_mode_starts_at_fixed_and_gets_gradients() -> None:
    torch.manual_seed(1)
    center, views, disp = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 3, 8, 8), torch.rand(2, 8, 8)
    fixed = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="fixed")
    learned = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="learned")
    assert isinstance(learned.logits, torch.nn.Parameter)
    assert [n for n, _ in fixed.named_parameters()] == []
    out = learned(center, views, disp)
    torch.testing.assert_close(out, fixed(center, views, disp), atol=1e-6, rtol=0)
    out.square().sum().backward()
    assert learned.logits.grad is not None and learned.logits.grad.abs().sum() > 0


def test_occlusion_mode_downweights_inconsistent_neighbour() -> None:
    torch.manual_seed(2)
    h, w = 16, 16
    center = 0.3 + 0.1 * torch.rand(1, 3, h, w)
    views = center[:, None].repeat(1, 4, 1, 1, 1)
    views[0, 1, :, 4:10, 4:10] = 1.0  # bright square in 5_6 only (an occluder)
    disp = torch.zeros(1, h, w)
    occ = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="occlusion")
    fixed = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="fixed")
    err_occ = (occ(center, views, disp) - center).abs().max().item()
    err_fixed = (fixed(center, views, disp) - center).abs().max().item()
    assert err_fixed > 0.05
    assert err_occ < 0.005
    # Consistent everywhere: occlusion mode reduces to the fixed weights.
    same = center[:, None].repeat(1, 4, 1, 1, 1)
    torch.testing.assert_close(occ(center, same, disp), fixed(center, same, disp), atol=1e-6, rtol=0)
    learn_tau = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="occlusion", learn_tau=True)
    learn_tau(center, views, disp).sum().backward()
    assert learn_tau.log_tau.grad is not None


def test_bf16_input_uses_float32_grid() -> None:
    h, w, d = 8, 512, 0.37
    center, views = render_views(h, w, d, OFFSETS)
    disp = torch.full((1, h, w), d)
    ref, _ = warp_to_center(views[None], disp, OFFSETS)
    out, _ = warp_to_center(views[None].bfloat16(), disp, OFFSETS)
    assert out.dtype == torch.bfloat16
    # Only the bf16 rounding of the images remains (2^-8 relative); a bf16 grid would be off by pixels.
    assert (out.float() - ref).abs().max().item() < 8e-3
    caam = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS)
    agg = caam(center[None].bfloat16(), views[None].bfloat16(), disp)
    assert agg.dtype == torch.bfloat16
    assert (agg.float() - caam(center[None], views[None], disp)).abs().max().item() < 8e-3


def test_grid_cache_is_reused() -> None:
    clear_grid_cache()
    views, disp = torch.rand(1, 4, 1, 9, 11), torch.rand(1, 9, 11)
    warp_to_center(views, disp, OFFSETS)
    warp_to_center(views, disp, OFFSETS)
    assert grid_cache_info()["misses"] == 1 and grid_cache_info()["hits"] == 1
    warp_to_center(torch.rand(1, 4, 1, 5, 5), torch.rand(1, 5, 5), OFFSETS)
    assert grid_cache_info()["misses"] == 2


def test_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="mode"):
        CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS, mode="median")
    with pytest.raises(ValueError, match="at least one"):
        CAAM(offsets=[])
    caam = CAAM(offsets=DEFAULT_NEIGHBOUR_OFFSETS)
    with pytest.raises(ValueError, match=r"expected V = 4 .* got 3"):
        caam(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 3, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match=r"disparity_px: expected shape \(1, 4, 4\)"):
        caam(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 3, 4, 4), torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match=r"center: expected shape \(1, 3, 4, 4\)"):
        caam(torch.rand(1, 1, 4, 4), torch.rand(1, 4, 3, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="offsets"):
        warp_to_center(torch.rand(1, 2, 1, 4, 4), torch.rand(1, 4, 4), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
