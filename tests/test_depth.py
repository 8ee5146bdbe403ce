"""Golden tests of the disparity -> depth-image mapping (model/depth.py)."""

from __future__ import annotations

import pytest
import torch

from model.depth import DEFAULT_DEPTH_RANGE, disparity_to_depth_image


def test_default_range_hand_computed_values() -> None:
    assert DEFAULT_DEPTH_RANGE == (-1.0, 1.0)
    disp = torch.tensor([[[-3.0, -1.0, -0.5, 0.0], [0.5, 1.0, 1.55, float("nan")]]])  # (1, 2, 4)
    img = disparity_to_depth_image(disp)
    assert img.shape == (1, 3, 2, 4) and img.dtype == torch.float32
    expected = torch.tensor([[0.0, 0.0, 0.25, 0.5], [0.75, 1.0, 1.0, 0.0]])
    for ch in range(3):
        assert torch.equal(img[0, ch], expected)


def test_custom_range_nearer_is_brighter() -> None:
    disp = torch.tensor([[[-0.47, 0.0, 0.54, 1.55, 2.0]]])
    img = disparity_to_depth_image(disp, disp_range=(-0.47, 1.55))
    row = img[0, 0, 0]
    assert row.tolist() == pytest.approx([0.0, 0.47 / 2.02, 1.01 / 2.02, 1.0, 1.0], abs=1e-6)
    assert bool((row[1:] >= row[:-1]).all())


def test_dtype_preserved_for_float_and_float32_for_int() -> None:
    disp = torch.tensor([[[0.0, 0.5]]])
    out = disparity_to_depth_image(disp.bfloat16())
    assert out.dtype == torch.bfloat16 and out.float()[0, 0, 0].tolist() == [0.5, 0.75]
    assert disparity_to_depth_image(disp.double()).dtype == torch.float64
    out_int = disparity_to_depth_image(torch.tensor([[[-2, 0, 2]]]))
    assert out_int.dtype == torch.float32 and out_int[0, 0, 0].tolist() == [0.0, 0.5, 1.0]


def test_bad_range_and_shape_raise() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        disparity_to_depth_image(torch.zeros(1, 2, 2), disp_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        disparity_to_depth_image(torch.zeros(1, 2, 2), disp_range=(2.0, -1.0))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        disparity_to_depth_image(torch.zeros(2, 2))
