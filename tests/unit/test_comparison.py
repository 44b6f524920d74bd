"""Matching nodules against a prior: statuses, their boundaries, doubling times, the optimal
assignment, Lung-RADS growth and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.comparison import (
    MIN_MATCH_MM,
    Change,
    Measured,
    Status,
    compare,
    lung_rads_growth,
)
from pipelines.findings import Nodule
from pipelines.registration import RigidTransform

pytestmark = pytest.mark.unit

SAME = RigidTransform.identity()


def _nodule(
    x: float, volume: float = 500.0, long_axis: float = 10.0, short_axis: float = 9.0
) -> Measured:
    return Measured((x, 0.0, 0.0), volume, long_axis, short_axis)


def _one(now: Measured, before: Measured, days: float = 365.0) -> Change:
    (change,) = compare([now], [before], SAME, days)
    return change


def test_a_nodule_of_the_same_volume_is_stable() -> None:
    change = _one(_nodule(1.0), _nodule(0.0))
    assert change.status is Status.STABLE
    assert (change.current, change.prior) == (0, 0)
    assert change.distance_mm == pytest.approx(1.0)
    assert change.volume_change_percent == pytest.approx(0.0)
    assert change.doubling_time_days is None


def test_exactly_25_percent_more_volume_is_growth_and_a_hair_less_is_not() -> None:
    assert _one(_nodule(0.0, 125.0), _nodule(0.0, 100.0)).status is Status.GROWN
    assert _one(_nodule(0.0, 124.99), _nodule(0.0, 100.0)).status is Status.STABLE


def test_exactly_25_percent_less_volume_is_shrinkage_and_a_hair_more_is_not() -> None:
    assert _one(_nodule(0.0, 75.0), _nodule(0.0, 100.0)).status is Status.SHRUNK
    assert _one(_nodule(0.0, 75.01), _nodule(0.0, 100.0)).status is Status.STABLE


def test_the_doubling_time_follows_the_exponential_model() -> None:
    change = _one(_nodule(0.0, 400.0), _nodule(0.0, 100.0), days=300.0)
    assert change.status is Status.GROWN
    assert change.volume_change_percent == pytest.approx(300.0)
    assert change.doubling_time_days == pytest.approx(150.0)  # two doublings in 300 days
    slow = _one(_nodule(0.0, 150.0), _nodule(0.0, 100.0), days=200.0)
    assert slow.doubling_time_days == pytest.approx(200.0 * math.log(2) / math.log(1.5))


def test_only_grown_nodules_get_a_doubling_time() -> None:
    assert _one(_nodule(0.0, 50.0), _nodule(0.0, 100.0)).doubling_time_days is None


def test_the_mean_diameter_change_is_rounded_to_the_diameters_precision() -> None:
    change = _one(_nodule(0.0, long_axis=8.2, short_axis=7.2), _nodule(0.0, 500.0, 6.2, 6.2))
    assert change.mean_diameter_change_mm == 1.5  # 7.7 - 6.2, not 1.5000000000000009
    assert not lung_rads_growth(change)


def test_lung_rads_growth_is_more_than_1_5_mm_within_12_months() -> None:
    before = _nodule(0.0, 500.0, 6.0, 6.0)
    now = _nodule(0.0, 500.0, 7.6, 7.6)
    assert lung_rads_growth(_one(now, before, days=366.0))
    assert not lung_rads_growth(_one(now, before, days=367.0))
    (new,) = compare([now], [], SAME, 365.0)
    assert not lung_rads_growth(new)


def test_unmeasured_volumes_are_graded_by_mean_diameter() -> None:
    change = _one(_nodule(0.0, 0.0, 9.0, 9.0), _nodule(0.0, 0.0, 7.0, 7.0))
    assert change.status is Status.GROWN
    assert change.volume_change_percent is None and change.doubling_time_days is None
    assert _one(_nodule(0.0, 0.0, 7.0, 7.0), _nodule(0.0, 500.0, 7.0, 7.0)).status is (
        Status.STABLE
    )


def test_a_pair_at_the_distance_bound_matches_and_beyond_it_does_not() -> None:
    small = compare([_nodule(MIN_MATCH_MM, long_axis=4.0)], [_nodule(0.0, long_axis=5.0)], SAME, 1)
    assert [c.status for c in small] == [Status.STABLE]
    apart = compare(
        [_nodule(MIN_MATCH_MM + 0.01, long_axis=4.0)], [_nodule(0.0, long_axis=5.0)], SAME, 1
    )
    assert [(c.status, c.current, c.prior) for c in apart] == [
        (Status.NEW, 0, None),
        (Status.RESOLVED, None, 0),
    ]


def test_the_bound_grows_with_the_larger_long_axis() -> None:
    big = compare([_nodule(20.0, long_axis=12.0)], [_nodule(0.0, long_axis=20.0)], SAME, 1)
    assert [c.status for c in big] == [Status.STABLE]
    assert [
        c.status for c in compare([_nodule(20.1)], [_nodule(0.0, long_axis=20.0)], SAME, 1)
    ] == [
        Status.NEW,
        Status.RESOLVED,
    ]


def test_prior_centres_are_mapped_into_the_current_study() -> None:
    # the patient lies 30 mm further along x in the prior: current x maps to prior x + 30
    moved = RigidTransform.of([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [30.0, 0.0, 0.0])
    (change,) = compare([_nodule(0.0)], [_nodule(30.0)], moved, 100.0)
    assert change.status is Status.STABLE
    assert change.distance_mm == pytest.approx(0.0)
    assert [c.status for c in compare([_nodule(0.0)], [_nodule(0.0)], moved, 100.0)] == [
        Status.NEW,
        Status.RESOLVED,
    ]


def test_the_assignment_is_globally_best_not_greedy() -> None:
    """Current 0 is nearest to prior 0, but taking that pair would leave current 1 unmatched;
    the optimal assignment pairs 0 with 1 and 1 with 0."""
    current = [_nodule(0.0), _nodule(9.0)]
    prior = [_nodule(2.0), _nodule(-5.0)]
    changes = compare(current, prior, SAME, 100.0)
    assert [(c.status, c.current, c.prior) for c in changes] == [
        (Status.STABLE, 0, 1),
        (Status.STABLE, 1, 0),
    ]
    assert [c.distance_mm for c in changes] == [pytest.approx(5.0), pytest.approx(7.0)]


def test_among_full_matchings_the_smallest_total_distance_wins() -> None:
    """Taking current 0's nearest (prior 0, 2 mm) would cost 2 + 6 mm; 3 + 1 mm is better."""
    current = [_nodule(0.0), _nodule(3.0)]
    prior = [_nodule(2.0), _nodule(-3.0)]
    changes = compare(current, prior, SAME, 100.0)
    assert [(c.current, c.prior) for c in changes] == [(0, 1), (1, 0)]


def test_the_output_lists_current_nodules_in_order_then_the_resolved_ones() -> None:
    current = [_nodule(100.0), _nodule(0.0, 1000.0), _nodule(-100.0)]
    prior = [_nodule(50.0), _nodule(0.5, 500.0), _nodule(-50.0)]
    changes = compare(current, prior, SAME, 180.0)
    assert [(c.status, c.current, c.prior) for c in changes] == [
        (Status.NEW, 0, None),
        (Status.GROWN, 1, 1),
        (Status.NEW, 2, None),
        (Status.RESOLVED, None, 0),
        (Status.RESOLVED, None, 2),
    ]
    assert all(c.interval_days == 180.0 for c in changes)


def test_empty_lists_give_new_or_resolved_only() -> None:
    assert compare([], [], SAME, 10.0) == []
    assert [c.status for c in compare([], [_nodule(0.0)], SAME, 10.0)] == [Status.RESOLVED]


@pytest.mark.parametrize("days", [0.0, -30.0, math.nan, math.inf])
def test_an_interval_that_is_not_a_positive_number_is_refused(days: float) -> None:
    with pytest.raises(ValueError, match="interval_days"):
        compare([_nodule(0.0)], [_nodule(0.0)], SAME, days)


def test_a_negative_volume_or_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Measured((0.0, 0.0, 0.0), -1.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="negative"):
        Measured((0.0, 0.0, 0.0), 10.0, -5.0, 5.0)


def test_measured_of_takes_a_detected_nodules_figures() -> None:
    nodule = Nodule(
        center_mm=(1.0, 2.0, 3.0),
        long_axis_mm=9.0,
        short_axis_mm=7.0,
        volume_mm3=250.0,
        mean_hu=20.0,
        type="part-solid",
        probability=0.9,
        needs_review=False,
        mask=np.zeros((2, 2, 2), bool),
    )
    measured = Measured.of(nodule)
    assert measured == Measured((1.0, 2.0, 3.0), 250.0, 9.0, 7.0, "part-solid")
    assert measured.mean_diameter_mm == 8.0
