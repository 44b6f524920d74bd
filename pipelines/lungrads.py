"""Lung-RADS v2022 categories of the detected nodules: baseline rules, and follow-up rules
against a prior CT.

Source: American College of Radiology, *Lung CT Screening Reporting & Data System (Lung-RADS)
Version 2022* (released November 2022; assessment categories table), https://www.acr.org/Clinical-
Resources/Reporting-and-Data-Systems/Lung-Rads. The **baseline** rows (no prior CT) go by
nodule attenuation type and mean diameter, the mean of long and short axis rounded half up to
one decimal place (mm):

- solid: < 6 mm category 2; ≥ 6 to < 8 mm 3; ≥ 8 to < 15 mm 4A; ≥ 15 mm 4B;
- part-solid: < 6 mm total 2; ≥ 6 mm total with a solid component < 6 mm 3; solid component
  ≥ 6 to < 8 mm 4A; solid component ≥ 8 mm 4B;
- ground-glass (non-solid): < 30 mm 2; ≥ 30 mm 3.

**Follow-up rules** (a prior CT was compared, :mod:`pipelines.comparison`; growth is a mean
diameter increase of more than 1.5 mm within 12 months,
:func:`pipelines.comparison.lung_rads_growth`; rows as tabulated in Christensen J, et al.
*ACR Lung-RADS v2022: Assessment Categories and Management Recommendations*, CHEST
2024;165(3):738-753), :func:`followup_category`:

- solid: new < 4 mm 2; new 4 to < 6 mm 3; new 6 to < 8 mm 4A; new ≥ 8 mm 4B; growing < 8 mm 4A;
  growing ≥ 8 mm 4B;
- part-solid: new < 6 mm total 3; new ≥ 6 mm with a solid component < 4 mm 4A, ≥ 4 mm 4B;
- ground-glass: new < 30 mm 2, new ≥ 30 mm 3; ≥ 30 mm and unchanged 2;
- any other nodule takes its size category (v2022: a nodule that crosses a size threshold is
  reclassified by size even without growth), stepped down when stable or smaller (v2022's
  stepped management): a category 3 nodule stable over at least 6 months (182 days) becomes 2, a
  4A stable over at least 3 months (91 days) becomes 3, unless its size category rose since the
  prior. Growth of a part-solid nodule's solid component is not tracked (the prior's solid
  component is not measured): such nodules keep their size category.

A study without nodules is category 1; a study's category is its highest nodule's; a study with
diffuse disease (multifocal sub-solid opacity, :mod:`pipelines.lesions`) is category 0 ("findings
suggestive of an inflammatory or infectious process", new in v2022) unless a nodule or mass of its
own is 4A or 4B. Not applied (they need what the detector does not measure): category 0 for its
other reasons (lungs not evaluable), calcification and fat (benign category 1/2 features),
perifissural and airway nodules, cysts, the 4X modifier (additional suspicious features such as
spiculation) and the slowly growing nodule (4B: growth over several screening rounds, each
below 1.5 mm in 12 months; one prior is compared). Lung-RADS applies to lung-cancer screening
CT; the node does not know whether a study is one, so the category is reported as decision
support, **not for clinical use**.
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


#: Intervals after which v2022's stepped management applies (3 and 6 months, in days).
STEP_DOWN_DAYS = {"4A": 91.0, "3": 182.0}


def followup_category(
    attenuation: str,
    mean_mm: float,
    solid_mean_mm: float,
    change: str,
    growing: bool,
    interval_days: float,
    prior_mean_mm: float | None = None,
) -> LungRads:
    """The follow-up category of one nodule compared with a prior CT (module docstring).

    Parameters
    ----------
    attenuation, mean_mm, solid_mean_mm
        As for :func:`nodule_category`.
    change : {"new", "stable", "grown", "shrunk"}
        :class:`pipelines.comparison.Status` of the nodule.
    growing : bool
        Lung-RADS growth (:func:`pipelines.comparison.lung_rads_growth`).
    interval_days : float
        Days since the prior.
    prior_mean_mm : float, optional
        The matched prior nodule's mean diameter (its size category bounds the stepping down).
    """
    size = nodule_category(attenuation, mean_mm, solid_mean_mm)
    if change == "new":
        return _new_category(attenuation, mean_mm, solid_mean_mm)
    if attenuation == "solid" and growing:
        return LungRads.CATEGORY_4A if mean_mm < 8.0 else LungRads.CATEGORY_4B
    if attenuation == "ground-glass" and change != "grown":
        return LungRads.CATEGORY_2  # < 30 mm: 2; >= 30 mm and unchanged: 2
    if change in ("stable", "shrunk"):
        before = None if prior_mean_mm is None else nodule_category(attenuation, prior_mean_mm)
        rose = before is not None and ORDER.index(size) > ORDER.index(before)
        if not rose and interval_days >= STEP_DOWN_DAYS.get(size.value, float("inf")):
            return ORDER[ORDER.index(size) - 1]
    return size


def _new_category(attenuation: str, mean_mm: float, solid_mean_mm: float) -> LungRads:
    if attenuation == "solid":
        if mean_mm < 4.0:
            return LungRads.CATEGORY_2
        if mean_mm < 6.0:
            return LungRads.CATEGORY_3
        return LungRads.CATEGORY_4A if mean_mm < 8.0 else LungRads.CATEGORY_4B
    if attenuation == "part-solid":
        if mean_mm < 6.0:
            return LungRads.CATEGORY_3
        return LungRads.CATEGORY_4A if solid_mean_mm < 4.0 else LungRads.CATEGORY_4B
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
