"""Outlines of nodule masks in image coordinates (PS3.3 C.18.6.1.1: pixel centre at +0.5)."""

from __future__ import annotations

import numpy as np

from pipelines.masks import long_axis, outline_points


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def test_a_single_pixel_outline_is_a_closed_diamond_around_its_centre() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 3] = True
    points = outline_points(mask)
    assert np.array_equal(points[0], points[-1])
    assert np.allclose(points[:-1].mean(axis=0), (3.5, 2.5))


def test_a_square_outline_encloses_the_pixels_within_half_a_pixel() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 4:12] = True  # 10 rows x 8 columns
    points = outline_points(mask)
    assert points[:, 0].min() >= 4.0 and points[:, 0].max() <= 12.0
    assert points[:, 1].min() >= 5.0 and points[:, 1].max() <= 15.0
    assert abs(_polygon_area(points) - 80.0) <= 2.0  # corners cut by half-pixel chamfers


def test_diagonally_touching_pixels_give_one_loop_over_both() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True
    points = outline_points(mask)
    assert points[:, 0].min() < 2.0 and points[:, 0].max() > 4.0


def test_long_axis_uses_pixel_spacing_per_axis() -> None:
    points = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 4.0]])
    ends, length = long_axis(points, (2.0, 0.5))  # rows 2 mm apart, columns 0.5 mm
    assert np.isclose(length, np.hypot(5.0, 8.0))
    assert {tuple(p) for p in ends} == {(10.0, 0.0), (0.0, 4.0)}
