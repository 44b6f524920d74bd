"""Lung-RADS v2022 categories at every boundary of the ACR table (baseline and follow-up rows),
and the mean diameter."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.findings import solid_axes_mm
from pipelines.lungrads import (
    LungRads,
    followup_category,
    mean_diameter_mm,
    nodule_category,
    study_category,
)

C1, C2, C3, C4A, C4B = (
    LungRads.CATEGORY_1,
    LungRads.CATEGORY_2,
    LungRads.CATEGORY_3,
    LungRads.CATEGORY_4A,
    LungRads.CATEGORY_4B,
)


@pytest.mark.parametrize(
    ("mean_mm", "category"),
    [(0.0, C2), (5.9, C2), (6.0, C3), (7.9, C3), (8.0, C4A), (14.9, C4A), (15.0, C4B), (40.0, C4B)],
)
def test_solid_nodules_follow_the_baseline_rows(mean_mm: float, category: LungRads) -> None:
    assert nodule_category("solid", mean_mm) is category


@pytest.mark.parametrize(
    ("mean_mm", "solid_mm", "category"),
    [
        (5.9, 5.9, C2),  # < 6 mm total: category 2 whatever the solid part
        (6.0, 0.0, C3),
        (6.0, 5.9, C3),
        (9.0, 6.0, C4A),
        (9.0, 7.9, C4A),
        (9.0, 8.0, C4B),
        (25.0, 12.0, C4B),
    ],
)
def test_part_solid_nodules_are_graded_by_total_size_then_solid_component(
    mean_mm: float, solid_mm: float, category: LungRads
) -> None:
    assert nodule_category("part-solid", mean_mm, solid_mm) is category


@pytest.mark.parametrize(("mean_mm", "category"), [(5.0, C2), (29.9, C2), (30.0, C3), (50.0, C3)])
def test_ground_glass_nodules_are_category_2_below_30_mm(
    mean_mm: float, category: LungRads
) -> None:
    assert nodule_category("ground-glass", mean_mm) is category


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="calcified"):
        nodule_category("calcified", 5.0)


@pytest.mark.parametrize(
    ("long_mm", "short_mm", "mean_mm"),
    [(6.0, 5.9, 6.0), (5.95, 5.95, 6.0), (5.94, 5.94, 5.9), (8.25, 6.0, 7.1), (10.0, 10.0, 10.0)],
)
def test_the_mean_diameter_is_rounded_half_up_to_one_decimal(
    long_mm: float, short_mm: float, mean_mm: float
) -> None:
    assert mean_diameter_mm(long_mm, short_mm) == mean_mm


def test_the_study_takes_its_most_suspicious_nodule_and_1_without_nodules() -> None:
    assert study_category([]) is C1
    assert study_category([C2, C4A, C3]) is C4A
    assert study_category([C2, C2]) is C2


def test_the_solid_component_is_the_largest_connected_part_above_minus_300_hu() -> None:
    mask = np.zeros((5, 20, 20), dtype=bool)
    mask[1:4, 2:18, 2:18] = True  # a 16-voxel (20 mm) ground-glass square...
    hu = np.full(mask.shape, -600.0)
    hu[1:4, 8:12, 8:12] = 20.0  # ...with a 4-voxel (5 mm) solid core
    hu[1:4, 3, 3] = 20.0  # and one solid speck apart from it
    long_mm, short_mm = solid_axes_mm(mask, hu[mask])
    assert long_mm == pytest.approx(np.hypot(3, 3) * 1.25 + 1.25, abs=0.01)
    assert short_mm <= long_mm and short_mm >= 4 * 1.25 - 0.01
    assert solid_axes_mm(mask, np.full(int(mask.sum()), -600.0)) == (0.0, 0.0)


# ------------------------------------------------------------------ follow-up rules (priors)


@pytest.mark.parametrize(
    ("mean_mm", "category"),
    [
        (3.9, LungRads.CATEGORY_2),
        (4.0, LungRads.CATEGORY_3),
        (5.9, LungRads.CATEGORY_3),
        (6.0, LungRads.CATEGORY_4A),
        (7.9, LungRads.CATEGORY_4A),
        (8.0, LungRads.CATEGORY_4B),
    ],
)
def test_a_new_solid_nodule_follows_the_new_rows(mean_mm: float, category: LungRads) -> None:
    assert followup_category("solid", mean_mm, 0.0, "new", False, 365.0) is category


@pytest.mark.parametrize(
    ("mean_mm", "category"),
    [(5.0, LungRads.CATEGORY_4A), (7.9, LungRads.CATEGORY_4A), (8.0, LungRads.CATEGORY_4B)],
)
def test_a_growing_solid_nodule_is_4a_below_8_mm_and_4b_from_8_mm(
    mean_mm: float, category: LungRads
) -> None:
    assert followup_category("solid", mean_mm, 0.0, "grown", True, 365.0) is category


def test_a_volume_grown_nodule_without_lung_rads_growth_takes_its_size_category() -> None:
    # 25 % more volume but the mean diameter up by 1.5 mm or less: not Lung-RADS growth
    assert followup_category("solid", 7.0, 0.0, "grown", False, 365.0) is LungRads.CATEGORY_3


@pytest.mark.parametrize(
    ("mean_mm", "days", "category"),
    [
        (7.0, 181.0, LungRads.CATEGORY_3),  # category 3 stable for less than 6 months
        (7.0, 182.0, LungRads.CATEGORY_2),  # stable for 6 months: stepped down
        (10.0, 90.0, LungRads.CATEGORY_4A),  # 4A stable for less than 3 months
        (10.0, 91.0, LungRads.CATEGORY_3),  # stable for 3 months: stepped down
        (20.0, 365.0, LungRads.CATEGORY_4B),  # 4B is not stepped down
        (5.0, 365.0, LungRads.CATEGORY_2),
    ],
)
def test_a_stable_nodule_is_stepped_down_after_its_follow_up_interval(
    mean_mm: float, days: float, category: LungRads
) -> None:
    assert followup_category("solid", mean_mm, 0.0, "stable", False, days, mean_mm) is category


def test_a_nodule_that_crossed_a_size_threshold_is_reclassified_by_size() -> None:
    # 7.8 mm (3) to 8.1 mm (4A) is no Lung-RADS growth, but the size category rose
    assert followup_category("solid", 8.1, 0.0, "stable", False, 365.0, 7.8) is LungRads.CATEGORY_4A
    assert followup_category("solid", 8.1, 0.0, "stable", False, 365.0, 8.0) is LungRads.CATEGORY_3


@pytest.mark.parametrize(
    ("mean_mm", "solid_mm", "category"),
    [
        (5.9, 0.0, LungRads.CATEGORY_3),
        (6.0, 3.9, LungRads.CATEGORY_4A),
        (6.0, 4.0, LungRads.CATEGORY_4B),
    ],
)
def test_a_new_part_solid_nodule_is_graded_by_total_size_then_its_new_solid_part(
    mean_mm: float, solid_mm: float, category: LungRads
) -> None:
    assert followup_category("part-solid", mean_mm, solid_mm, "new", False, 365.0) is category


@pytest.mark.parametrize(
    ("mean_mm", "change", "category"),
    [
        (29.9, "new", LungRads.CATEGORY_2),
        (30.0, "new", LungRads.CATEGORY_3),
        (35.0, "stable", LungRads.CATEGORY_2),
        (35.0, "grown", LungRads.CATEGORY_3),
    ],
)
def test_ground_glass_nodules_follow_up(mean_mm: float, change: str, category: LungRads) -> None:
    assert followup_category("ground-glass", mean_mm, 0.0, change, False, 365.0) is category
