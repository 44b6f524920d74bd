"""Nodule measurements: diameters on the largest axial slice, attenuation type, review flag."""

from __future__ import annotations

import numpy as np

from pipelines.findings import attenuation_type, axes_mm, describe, needs_review
from pipelines.preprocess import ISO_SPACING_MM
from pipelines.refine import Finding


def _ellipsoid(shape: int, radii_vox: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.mgrid[:shape, :shape, :shape] - shape // 2
    rz, ry, rx = radii_vox
    return (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def test_the_long_and_short_axes_of_an_ellipse_are_its_diameters() -> None:
    mask = _ellipsoid(32, (4, 6, 10))
    long_axis, short_axis = axes_mm(mask)
    assert abs(long_axis - 21 * ISO_SPACING_MM) <= 1.5 * ISO_SPACING_MM
    assert abs(short_axis - 13 * ISO_SPACING_MM) <= 1.5 * ISO_SPACING_MM


def test_a_rotated_ellipse_measures_the_same() -> None:
    from scipy import ndimage

    mask = _ellipsoid(32, (4, 6, 10))
    rotated = ndimage.rotate(mask.astype(float), 35, axes=(1, 2), reshape=False, order=1) > 0.5
    long_axis, short_axis = axes_mm(rotated)
    assert abs(long_axis - 21 * ISO_SPACING_MM) <= 2 * ISO_SPACING_MM
    assert abs(short_axis - 13 * ISO_SPACING_MM) <= 2 * ISO_SPACING_MM


def test_attenuation_types_follow_the_solid_fraction_of_the_core() -> None:
    mask = _ellipsoid(16, (5, 5, 5))
    n = int(mask.sum())
    assert attenuation_type(mask, np.full(n, 30.0)) == "solid"
    assert attenuation_type(mask, np.full(n, -600.0)) == "ground-glass"
    mixed = np.where(np.arange(n) % 2 == 0, 30.0, -600.0)
    assert attenuation_type(mask, mixed) == "part-solid"


def test_a_finding_near_the_operating_point_needs_review_and_reports_mean_hu() -> None:
    mask = _ellipsoid(32, (4, 4, 4))
    volume = np.full((64, 64, 64), -850.0, np.float32)
    volume[16:48, 16:48, 16:48][mask] = 40.0
    origin = (10.0, 20.0, 30.0)
    mask_origin = tuple(o + 16 * ISO_SPACING_MM for o in origin)
    finding = Finding(
        centre_xyz_mm=(0.0, 0.0, 0.0),
        probability=0.55,
        diameter_mm=10.0,
        equivalent_diameter_mm=10.0,
        volume_mm3=float(mask.sum()) * ISO_SPACING_MM**3,
        stage1_score=0.9,
        mask=mask,
        mask_origin_xyz_mm=mask_origin,  # type: ignore[arg-type]
    )
    nodule = describe(finding, volume, origin, threshold=0.5, review_band=0.5)
    assert nodule.mean_hu == 40.0 and nodule.type == "solid" and nodule.needs_review
    assert not describe(finding, volume, origin, threshold=0.4, review_band=0.1).needs_review


def test_the_review_band_is_a_fraction_of_the_range_above_the_threshold() -> None:
    # threshold 0.9, band 0.5: the lower half of 0.9 .. 1 needs review
    assert needs_review(0.9, 0.9, 0.5) and needs_review(0.9499, 0.9, 0.5)
    assert not needs_review(0.9501, 0.9, 0.5) and not needs_review(0.99, 0.9, 0.5)
    # the same band at threshold 0.5 reaches 0.75
    assert needs_review(0.7499, 0.5, 0.5) and not needs_review(0.75, 0.5, 0.5)
    # band 0: nothing above the threshold; band 1: everything below 1
    assert not needs_review(0.9, 0.9, 0.0) and needs_review(0.9999, 0.9, 1.0)
