"""Nodules of a CT against the same patient's prior CT: matching and growth.

The prior's nodule centres are mapped into the current study with the rigid transform of
:func:`pipelines.registration.register_rigid`, then current and prior nodules are paired one to
one by the optimal assignment on centre distance (Kuhn's Hungarian method, as
:func:`scipy.optimize.linear_sum_assignment`): the most pairs possible, and among those the
smallest total distance. A pair is admissible only when its distance is at most
``max(MIN_MATCH_MM, MATCH_FACTOR x the larger long axis)``, so a large nodule may have moved
further than a small one and still be itself.

Growth, by volume (the NELSON trial's criterion): a matched nodule whose volume changed by at
least +25 % has grown; its volume-doubling time is ``interval x ln 2 / ln(V_now / V_prior)``
(the exponential growth model of Collins VP, Loeffler RK, Tivey H. *Observations on growth rates of
human tumors.* Am J Roentgenol Radium Ther Nucl Med 1956;76:988-1000). Sources:

- Xu DM, Gietema H, de Koning H, et al. *Nodule management protocol of the NELSON randomised lung
  cancer screening trial.* Lung Cancer 2006;54:177-84 (growth: a volume change of 25 % or more,
  beyond the measurement error of semi-automated volumetry).
- Horeweg N, van Rosmalen J, Heuvelmans MA, et al. *Lung cancer probability in patients with
  CT-detected pulmonary nodules: a prespecified analysis of data from the NELSON trial of low-dose
  CT screening.* Lancet Oncol 2014;15:1332-41 (volume and volume-doubling time as predictors:
  VDT under 400 days marks a high cancer probability).

A change of -25 % or less is called shrunk here, the symmetric counterpart (NELSON defines growth
only); anything in between is stable. A nodule without a measured volume (0 mm³) on either scan
is graded by the Lung-RADS mean-diameter threshold instead (below).

Lung-RADS v2022 (American College of Radiology, *Lung CT Screening Reporting & Data System
(Lung-RADS) Version 2022*, https://www.acr.org/Clinical-Resources/Reporting-and-Data-Systems/
Lung-Rads) defines growth by diameter, not volume: an increase in mean diameter (mean of long and
short axis, to one decimal, :func:`pipelines.lungrads.mean_diameter_mm`) of **more than 1.5 mm
within a 12-month period**. :func:`lung_rads_growth` applies exactly that; a slower increase seen
over a longer interval is not "growth" by that definition (v2022 names it *slowly growing*, a
4B feature for solid and part-solid nodules growing over several screening rounds, which needs the
whole series of exams and is not decided here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from pipelines.findings import Nodule
from pipelines.lungrads import mean_diameter_mm
from pipelines.registration import RigidTransform

#: Smallest distance bound of a match (mm), whatever the nodules' size.
MIN_MATCH_MM = 8.0
#: The distance bound is this times the larger long axis of the pair, when that is larger.
MATCH_FACTOR = 1.0
#: Volume change (percent) at or above which a nodule has grown (NELSON), at or below minus
#: which it has shrunk.
GROWTH_PERCENT = 25.0
#: Lung-RADS v2022 growth: mean diameter increase above this (mm) ...
LUNG_RADS_GROWTH_MM = 1.5
#: ... within 12 months (days; 366 so that a yearly exam in a leap year counts).
LUNG_RADS_GROWTH_DAYS = 366.0


@dataclass(frozen=True)
class Measured:
    """One nodule at one time point.

    Attributes
    ----------
    centre_mm : tuple of float
        LPS ``(x, y, z)`` centre in its own study's patient space.
    volume_mm3 : float
        Volume; 0 when not measured.
    long_axis_mm, short_axis_mm : float
        Axial long axis and the longest extent perpendicular to it.
    attenuation : str
        ``solid``, ``part-solid`` or ``ground-glass``.

    Raises
    ------
    ValueError
        For a negative volume or axis.
    """

    centre_mm: tuple[float, float, float]
    volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    attenuation: str = "solid"

    def __post_init__(self) -> None:
        if min(self.volume_mm3, self.long_axis_mm, self.short_axis_mm) < 0:
            raise ValueError(f"negative volume or axis: {self}")

    @classmethod
    def of(cls, nodule: Nodule) -> Measured:
        """The measurements of a detected nodule."""
        return cls(
            centre_mm=nodule.center_mm,
            volume_mm3=nodule.volume_mm3,
            long_axis_mm=nodule.long_axis_mm,
            short_axis_mm=nodule.short_axis_mm,
            attenuation=nodule.type,
        )

    @property
    def mean_diameter_mm(self) -> float:
        """Lung-RADS mean diameter (:func:`pipelines.lungrads.mean_diameter_mm`)."""
        return mean_diameter_mm(self.long_axis_mm, self.short_axis_mm)


class Status(StrEnum):
    """What became of a nodule between the prior and the current study."""

    NEW = "new"
    STABLE = "stable"
    GROWN = "grown"
    SHRUNK = "shrunk"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Change:
    """One nodule's change between the prior and the current study.

    Attributes
    ----------
    status : Status
        See :class:`Status`.
    current, prior : int or None
        Index in the current and prior lists (None: absent from that study).
    distance_mm : float or None
        Distance of the matched centres after alignment.
    volume_change_percent : float or None
        ``100 (V_now / V_prior - 1)``; None unless matched with both volumes measured.
    doubling_time_days : float or None
        Volume-doubling time, for grown nodules with measured volumes only.
    mean_diameter_change_mm : float or None
        Lung-RADS mean diameter now minus prior, rounded to 0.1 mm (the diameters' precision,
        so that 7.7 - 6.2 is 1.5 and not a hair more).
    interval_days : float
        Days between the two studies.
    """

    status: Status
    current: int | None
    prior: int | None
    distance_mm: float | None
    volume_change_percent: float | None
    doubling_time_days: float | None
    mean_diameter_change_mm: float | None
    interval_days: float


def lung_rads_growth(change: Change) -> bool:
    """Whether Lung-RADS v2022 calls this growth: mean diameter up by more than 1.5 mm within
    12 months (:data:`LUNG_RADS_GROWTH_DAYS`); False for unmatched nodules and longer intervals.
    """
    grown = change.mean_diameter_change_mm
    return (
        grown is not None
        and grown > LUNG_RADS_GROWTH_MM
        and change.interval_days <= LUNG_RADS_GROWTH_DAYS
    )


def compare(
    current: Sequence[Measured],
    prior: Sequence[Measured],
    transform: RigidTransform,
    interval_days: float,
) -> list[Change]:
    """Match current nodules to prior ones and grade each pair's change.

    Parameters
    ----------
    current, prior : sequence of Measured
        The nodules of the current study and of the prior, each in its own patient space.
    transform : RigidTransform
        Current to prior patient space (:func:`pipelines.registration.register_rigid`).
    interval_days : float
        Days from the prior to the current study.

    Returns
    -------
    list of Change
        One per current nodule in current order (matched or NEW), then one per unmatched prior
        nodule in prior order (RESOLVED).

    Raises
    ------
    ValueError
        When ``interval_days`` is not a positive number.
    """
    if not interval_days > 0 or not math.isfinite(interval_days):
        raise ValueError(f"interval_days must be positive, got {interval_days}")
    pairs = _match(current, prior, transform)
    changes: list[Change] = []
    for i, now in enumerate(current):
        if i in pairs:
            j, distance = pairs[i]
            changes.append(_matched(i, now, j, prior[j], distance, interval_days))
        else:
            changes.append(Change(Status.NEW, i, None, None, None, None, None, interval_days))
    matched = {j for j, _ in pairs.values()}
    changes.extend(
        Change(Status.RESOLVED, None, j, None, None, None, None, interval_days)
        for j in range(len(prior))
        if j not in matched
    )
    return changes


def match_bound_mm(a: Measured, b: Measured) -> float:
    """Largest centre distance at which ``a`` and ``b`` may be one nodule (mm)."""
    return max(MIN_MATCH_MM, MATCH_FACTOR * max(a.long_axis_mm, b.long_axis_mm))


def _match(
    current: Sequence[Measured], prior: Sequence[Measured], transform: RigidTransform
) -> dict[int, tuple[int, float]]:
    """Current index to (prior index, distance) of the optimal admissible assignment."""
    if not current or not prior:
        return {}
    here = np.array([m.centre_mm for m in current], dtype=np.float64)
    there = transform.to_current(np.array([m.centre_mm for m in prior], dtype=np.float64))
    distance: npt.NDArray[np.float64] = np.linalg.norm(here[:, None] - there[None, :], axis=-1)
    bound = np.array([[match_bound_mm(a, b) for b in prior] for a in current])
    admissible = distance <= bound
    # an inadmissible pair costs more than all admissible ones together: most pairs first
    cost = np.where(admissible, distance, 1.0 + float(distance[admissible].sum()))
    rows, cols = linear_sum_assignment(cost)
    return {
        int(i): (int(j), float(distance[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if admissible[i, j]
    }


def _matched(
    i: int, now: Measured, j: int, before: Measured, distance: float, interval_days: float
) -> Change:
    """The change of a matched pair."""
    diameter = round(now.mean_diameter_mm - before.mean_diameter_mm, 1)
    if now.volume_mm3 > 0 and before.volume_mm3 > 0:
        percent = 100.0 * (now.volume_mm3 / before.volume_mm3 - 1.0)
        status = _by_volume(percent)
    else:
        percent, status = None, _by_diameter(diameter)
    doubling = None
    if status is Status.GROWN and percent is not None:
        doubling = interval_days * math.log(2.0) / math.log(now.volume_mm3 / before.volume_mm3)
    return Change(status, i, j, distance, percent, doubling, diameter, interval_days)


def _by_volume(percent: float) -> Status:
    if percent >= GROWTH_PERCENT:
        return Status.GROWN
    if percent <= -GROWTH_PERCENT:
        return Status.SHRUNK
    return Status.STABLE


def _by_diameter(change_mm: float) -> Status:
    if change_mm > LUNG_RADS_GROWTH_MM:
        return Status.GROWN
    if change_mm < -LUNG_RADS_GROWTH_MM:
        return Status.SHRUNK
    return Status.STABLE
