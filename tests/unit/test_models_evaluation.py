"""FROC / CPM (LUNA16 rules) and Dice on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import (
    FP_RATES,
    EvalDetection,
    Reference,
    ScanCase,
    dice,
    fps_per_scan,
    froc,
    match_scan,
    sensitivity_by_size,
    threshold_at_fp_rate,
)


def _ref(x: float, d: float = 10.0) -> Reference:
    return Reference((x, 0.0, 0.0), d)


def _det(x: float, p: float) -> EvalDetection:
    return EvalDetection((x, 0.0, 0.0), p)


def test_detection_inside_the_radius_hits_and_outside_is_a_false_positive() -> None:
    case = ScanCase([_ref(0.0, 10.0)], [_det(4.9, 0.8), _det(5.1 + 10, 0.7)])
    best, fps = match_scan(case)
    assert best.tolist() == [0.8]
    assert fps == [0.7]


def test_second_hit_on_the_same_nodule_is_neither_true_nor_false_positive() -> None:
    best, fps = match_scan(ScanCase([_ref(0.0)], [_det(1.0, 0.9), _det(-1.0, 0.4)]))
    assert best.tolist() == [0.9]
    assert fps == []


def test_detection_on_an_ignored_finding_is_not_counted() -> None:
    case = ScanCase([_ref(0.0)], [_det(50.0, 0.9)], ignore=[_ref(50.0, 4.0)])
    assert match_scan(case)[1] == []


def test_perfect_detector_scores_cpm_one() -> None:
    cases = [ScanCase([_ref(0.0)], [_det(0.0, 0.9)]) for _ in range(4)]
    res = froc(cases)
    assert res.cpm == 1.0
    assert all(v == 1.0 for v in res.sensitivities_at.values())


def test_known_froc_with_false_positives_ranked_between_hits() -> None:
    # 4 scans, 4 nodules. Hits at p = .9, .7, .5; one nodule missed. FPs at .8, .6 (scan 0)
    # and .3 (scan 1). Sweeping thresholds: t=.9 -> sens .25, 0 FP; t=.8 -> .25, 1/4 FP/scan;
    # t=.7 -> .5, .25; t=.6 -> .5, .5; t=.5 -> .75, .5; t=.3 -> .75, .75.
    cases = [
        ScanCase([_ref(0.0)], [_det(0.0, 0.9), _det(40.0, 0.8), _det(80.0, 0.6)]),
        ScanCase([_ref(0.0)], [_det(0.0, 0.7), _det(40.0, 0.3)]),
        ScanCase([_ref(0.0)], [_det(0.0, 0.5)]),
        ScanCase([_ref(0.0)], []),
    ]
    res = froc(cases)
    expected = {0.125: 0.25, 0.25: 0.5, 0.5: 0.75, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert res.sensitivities_at == expected
    assert res.cpm == pytest.approx(np.mean(list(expected.values())))
    assert tuple(res.sensitivities_at) == FP_RATES
    assert fps_per_scan(cases, 0.55) == pytest.approx(0.5)


def test_no_detections_scores_zero() -> None:
    assert froc([ScanCase([_ref(0.0)], [])]).cpm == 0.0


def test_sensitivity_by_size_bins_references_by_diameter() -> None:
    refs = [_ref(0.0, 4.0), _ref(100.0, 25.0), _ref(200.0, 30.0), _ref(300.0, 38.0)]
    cases = [ScanCase(refs, [_det(0.5, 0.9), _det(300.0, 0.9)])]
    out = sensitivity_by_size(cases, 0.5)
    assert out["3-5 mm"] == (1.0, 1)
    assert out["20-30 mm"] == (0.0, 2)  # 30.0 mm is still a nodule (a mass is over 30 mm)
    assert out["30-45 mm"] == (1.0, 1)
    assert np.isnan(out["5-10 mm"][0])


def test_dice_of_half_overlapping_masks() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_threshold_at_fp_rate_is_the_lowest_with_at_most_that_many_false_positives() -> None:
    # two scans; false positives at 0.9, 0.6 (scan 1) and 0.8 (scan 2)
    cases = [
        ScanCase([_ref(0.0)], [_det(0.0, 0.7), _det(50.0, 0.9), _det(80.0, 0.6)]),
        ScanCase([], [_det(50.0, 0.8)]),
    ]
    assert threshold_at_fp_rate(cases, 0.5) == 0.9  # 1 FP in 2 scans
    assert threshold_at_fp_rate(cases, 1.0) == 0.7  # 0.6 would make 3 FPs in 2 scans
    assert threshold_at_fp_rate(cases, 2.0) == 0.6
    assert threshold_at_fp_rate([ScanCase([], [_det(0.0, 0.5)])], 0.5) == float("inf")
