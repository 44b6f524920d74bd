"""Lung-RADS v2022 categories of the detected nodules, baseline screening rules.

Source: American College of Radiology, *Lung CT Screening Reporting & Data System (Lung-RADS)
Version 2022* (released November 2022; assessment categories table), https://www.acr.org/Clinical-
Resources/Reporting-and-Data-Systems/Lung-Rads. The rules applied here are the **baseline** rows
(no prior CT; follow-up rules need priors and come with them), by nodule attenuation type and
mean diameter, the mean of long and short axis rounded half up to one decimal place (mm):

- solid: < 6 mm category 2; ≥ 6 to < 8 mm 3; ≥ 8 to < 15 mm 4A; ≥ 15 mm 4B;
- part-solid: < 6 mm total 2; ≥ 6 mm total with a solid component < 6 mm 3; solid component
  ≥ 6 to < 8 mm 4A; solid component ≥ 8 mm 4B;
- ground-glass (non-solid): < 30 mm 2; ≥ 30 mm 3.

A study without nodules is category 1; a study's category is its highest nodule's; a study with
diffuse disease (multifocal sub-solid opacity, :mod:`pipelines.lesions`) is category 0 ("findings
suggestive of an inflammatory or infectious process", new in v2022) unless a nodule or mass of its
own is 4A or 4B. Not applied (they need what the detector does not measure): category 0 for its
other reasons (priors being located, lungs not evaluable), calcification and fat (benign
category 1/2 features), perifissural and airway nodules, cysts, and the 4X modifier (additional
suspicious features such as spiculation). Lung-RADS applies to lung-cancer screening CT; the node
does not know whether a study is one, so the category is reported as decision support, **not
for clinical use**.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

#: The Lung-RADS version these rules implement.
VERSION = "v2022"


class LungRads(StrEnum):
    """Lung-RADS v2022 assessment categories (those the baseline rules here can give)."""

    #: Incomplete; here only for "findings suggestive of an inflammatory or infectious process".
    CATEGORY_0 = "0"
    CATEGORY_1 = "1"
    CATEGORY_2 = "2"
    CATEGORY_3 = "3"
    CATEGORY_4A = "4A"
    CATEGORY_4B = "4B"


#: From least to most suspicious.
ORDER = (
    LungRads.CATEGORY_1,
    LungRads.CATEGORY_2,
    LungRads.CATEGORY_3,
    LungRads.CATEGORY_4A,
    LungRads.CATEGORY_4B,
)


def mean_diameter_mm(long_axis_mm: float, short_axis_mm: float) -> float:
    """Lung-RADS mean diameter: the mean of long and short axis, rounded half up to one decimal
    (mm; decimal arithmetic, so that 5.95 is 6.0 as a reader would round it)."""
    mean = (Decimal(repr(long_axis_mm)) + Decimal(repr(short_axis_mm))) / 2
    return float(mean.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def nodule_category(attenuation: str, mean_mm: float, solid_mean_mm: float = 0.0) -> LungRads:
    """The baseline category of one nodule.

    Parameters
    ----------
    attenuation : {"solid", "part-solid", "ground-glass"}
        The nodule's type (:func:`pipelines.findings.attenuation_type`).
    mean_mm : float
        Mean diameter of the whole nodule (:func:`mean_diameter_mm`).
    solid_mean_mm : float
        Mean diameter of the solid component (part-solid nodules only).

    Raises
    ------
    ValueError
        For an unknown attenuation type.
    """
    if attenuation == "solid":
        if mean_mm < 6.0:
            return LungRads.CATEGORY_2
        if mean_mm < 8.0:
            return LungRads.CATEGORY_3
        if mean_mm < 15.0:
            return LungRads.CATEGORY_4A
        return LungRads.CATEGORY_4B
    if attenuation == "part-solid":
        if mean_mm < 6.0:
            return LungRads.CATEGORY_2
        if solid_mean_mm < 6.0:
            return LungRads.CATEGORY_3
        if solid_mean_mm < 8.0:
            return LungRads.CATEGORY_4A
        return LungRads.CATEGORY_4B
    if attenuation == "ground-glass":
        return LungRads.CATEGORY_2 if mean_mm < 30.0 else LungRads.CATEGORY_3
    raise ValueError(f"unknown attenuation type {attenuation!r}")


def study_category(categories: Iterable[LungRads], diffuse_disease: bool = False) -> LungRads:
    """The study's category: its most suspicious nodule's, 1 without nodules.

    With diffuse disease (:mod:`pipelines.lesions`: multifocal sub-solid opacity) the study is 0,
    "findings suggestive of an inflammatory or infectious process" (v2022 category 0, CT again in
    1-3 months), unless a nodule or mass of its own is 4A or 4B, which stays.
    """
    highest = max(categories, key=ORDER.index, default=LungRads.CATEGORY_1)
    if diffuse_disease and highest not in (LungRads.CATEGORY_4A, LungRads.CATEGORY_4B):
        return LungRads.CATEGORY_0
    return highest
