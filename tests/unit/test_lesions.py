"""Lesion classes at their boundaries: nodule up to 30 mm, mass above; multifocal bilateral
sub-solid opacity is diffuse disease, which makes the study Lung-RADS 0 unless 4A/4B."""

from __future__ import annotations

import pytest

from pipelines.lesions import (
    MASS_MM,
    MULTIFOCAL_COUNT,
    MULTIFOCAL_MIN_MM,
    Focus,
    LesionClass,
    classify,
    diffuse_disease,
)
from pipelines.lungrads import LungRads, study_category

pytestmark = pytest.mark.unit

NODULE, MASS, DIFFUSE = LesionClass.NODULE, LesionClass.MASS, LesionClass.DIFFUSE


@pytest.mark.parametrize(
    ("long_axis", "expected"), [(29.9, NODULE), (MASS_MM, NODULE), (30.1, MASS), (55.0, MASS)]
)
def test_a_focal_lesion_over_30_mm_is_a_mass(long_axis: float, expected: LesionClass) -> None:
    for kind in ("solid", "part-solid", "ground-glass"):
        assert classify([Focus(kind, long_axis, 50.0)]) == [expected]


def _bilateral(n: int, size: float = MULTIFOCAL_MIN_MM) -> list[Focus]:
    return [Focus("ground-glass", size, 60.0 if i % 2 else -60.0) for i in range(n)]


def test_multifocal_bilateral_sub_solid_opacity_is_diffuse_disease() -> None:
    findings = [*_bilateral(MULTIFOCAL_COUNT), Focus("ground-glass", 4.0, 80.0)]
    findings += [Focus("part-solid", 45.0, -70.0), Focus("solid", 8.0, 30.0)]
    assert diffuse_disease(findings)
    # every sub-solid finding belongs to it, even small or large ones; a solid nodule stays one
    assert classify(findings) == [DIFFUSE] * (MULTIFOCAL_COUNT + 2) + [NODULE]


def test_fewer_opacities_smaller_ones_or_one_lung_are_not_diffuse_disease() -> None:
    assert not diffuse_disease(_bilateral(MULTIFOCAL_COUNT - 1))
    assert not diffuse_disease(_bilateral(MULTIFOCAL_COUNT, MULTIFOCAL_MIN_MM - 0.1))
    one_lung = [Focus("ground-glass", 20.0, 60.0 + i) for i in range(MULTIFOCAL_COUNT + 2)]
    assert not diffuse_disease(one_lung)
    solid = [Focus("solid", 20.0, (-1) ** i * 60.0) for i in range(MULTIFOCAL_COUNT + 2)]
    assert not diffuse_disease(solid)
    assert classify(solid) == [NODULE] * len(solid)


@pytest.mark.parametrize(
    ("categories", "diffuse", "expected"),
    [
        ([], True, LungRads.CATEGORY_0),
        ([LungRads.CATEGORY_2, LungRads.CATEGORY_3], True, LungRads.CATEGORY_0),
        ([LungRads.CATEGORY_4A], True, LungRads.CATEGORY_4A),
        ([LungRads.CATEGORY_2, LungRads.CATEGORY_4B], True, LungRads.CATEGORY_4B),
        ([LungRads.CATEGORY_3], False, LungRads.CATEGORY_3),
        ([], False, LungRads.CATEGORY_1),
    ],
)
def test_diffuse_disease_makes_the_study_lung_rads_0_unless_4a_or_4b(
    categories: list[LungRads], diffuse: bool, expected: LungRads
) -> None:
    assert study_category(categories, diffuse_disease=diffuse) is expected
