"""Comparison with a prior CT end to end on phantom pairs: both studies written as DICOM and read
back, the real detector (ONNX Runtime on the CPU) run on each, the follow-up registered to the
baseline, and the detections compared; every painted nodule must come out with its true status,
its matched centres close after alignment and, when it grew, its doubling time close to the truth.

``pytest -s`` prints a table per pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.phantom import PairNodule, PhantomPair, make_phantom_pair, write_phantom_pair
from pipelines.comparison import Change, Measured, Status, compare
from pipelines.detect import Detector, DetectorConfig
from pipelines.registration import Registration, register_rigid
from pipelines.volume import build_volume

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Seed and interval (days) of each pair.
PAIRS = ((101, 90), (102, 180), (103, 365), (104, 400), (105, 730))
#: Scan geometry: a 90 mm slab, 288 mm field of view (the detector's time grows with both).
SHAPE, SPACING = (36, 320, 320), (2.5, 0.9, 0.9)
#: Registration error allowed at the nodules (mm).
REGISTERED_MM = 1.5
#: A detection within this distance of a painted nodule's centre is that nodule (mm).
DETECTED_MM = 5.0
#: Matched centres after alignment at most this far apart (mm).
MATCHED_MM = 3.0
#: Measured doubling time within this fraction of the truth, for grown nodules of 6 mm or more.
VDT_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(DetectorConfig(backend="onnx-cpu"))


def _nearest(found: list[Measured], centre: tuple[float, float, float] | None) -> int | None:
    """Index of the detection within :data:`DETECTED_MM` of ``centre`` (nearest), if any."""
    if centre is None or not found:
        return None
    distance = [float(np.linalg.norm(np.subtract(m.centre_mm, centre))) for m in found]
    best = int(np.argmin(distance))
    return best if distance[best] <= DETECTED_MM else None


def _change_of(changes: list[Change], current: int | None, prior: int | None) -> Change | None:
    """The change that reports the current detection (or, for a resolved nodule, the prior's)."""
    for change in changes:
        if (current is not None and change.current == current) or (
            current is None and prior is not None and change.prior == prior
        ):
            return change
    return None


def _problems(
    truth: PairNodule, baseline: int | None, followup: int | None, change: Change | None
) -> list[str]:
    """What is wrong with one painted nodule's outcome (nothing: empty)."""
    problems = []
    if truth.baseline_centre_mm is not None and baseline is None:
        problems.append("missed on the baseline")
    if truth.followup_centre_mm is not None and followup is None:
        problems.append("missed on the follow-up")
    if change is None:
        return [*problems, "no change reported"]
    if change.status != truth.status:
        problems.append(f"status {change.status}, truth {truth.status}")
    if truth.status in (Status.STABLE, Status.GROWN) and change.prior != baseline:
        problems.append("matched to another prior nodule")
    if change.distance_mm is not None and change.distance_mm > MATCHED_MM:
        problems.append(f"centres {change.distance_mm:.2f} mm apart")
    vdt = change.doubling_time_days
    if truth.doubling_time_days is not None and (
        vdt is None or abs(vdt / truth.doubling_time_days - 1.0) > VDT_TOLERANCE
    ):
        problems.append(f"doubling time {vdt} days, truth {truth.doubling_time_days:.0f}")
    return problems


def _table(
    pair: PhantomPair,
    registration: Registration,
    error: float,
    rows: list[tuple[PairNodule, Measured | None, Measured | None, Change | None, list[str]]],
    extra: list[Change],
) -> str:
    """The per-nodule table printed under ``pytest -s``."""
    lines = [
        f"pair seed {pair.seed}, {pair.interval_days} days; true motion "
        f"{pair.transform.rotation_deg:.2f} deg; registration {registration.seconds:.1f} s, "
        f"error at the nodules max {error:.2f} mm, overlap {registration.overlap:.2f}",
        f"  {'truth':9} {'found':9} {'V base':>7} {'meas':>7} {'V f-up':>7} {'meas':>7} "
        f"{'VDT':>5} {'meas':>5} {'dist':>5}  problems",
    ]
    for truth, before, now, change, problems in rows:
        lines.append(
            f"  {truth.status:9} {str(change.status) if change else '-':9} "
            f"{_num(truth.baseline_volume_mm3)} {_num(before.volume_mm3 if before else None)} "
            f"{_num(truth.followup_volume_mm3)} {_num(now.volume_mm3 if now else None)} "
            f"{_num(truth.doubling_time_days, 5)} "
            f"{_num(change.doubling_time_days if change else None, 5)} "
            f"{_num(change.distance_mm if change else None, 5, 2)}  {'; '.join(problems) or 'ok'}"
        )
    lines.append(f"  other detections: {[(str(c.status), c.current, c.prior) for c in extra]}")
    return "\n".join(lines)


def _registration_error_mm(pair: PhantomPair, registration: Registration) -> float:
    """Largest registration error at the follow-up positions of the painted nodules (mm)."""
    points = np.array(
        [
            n.followup_centre_mm or tuple(pair.transform.to_current(n.baseline_centre_mm))
            for n in pair.nodules
        ],
        dtype=np.float64,
    )
    found, truth = registration.transform.to_prior(points), pair.transform.to_prior(points)
    return float(np.linalg.norm(found - truth, axis=1).max())


def _num(value: float | None, width: int = 7, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


@pytest.mark.parametrize(("seed", "interval_days"), PAIRS)
def test_every_painted_nodule_comes_out_with_its_status_and_growth(
    seed: int, interval_days: int, detector: Detector, tmp_path: Path
) -> None:
    pair = make_phantom_pair(seed, interval_days, shape=SHAPE, spacing_mm=SPACING)
    baseline_paths, followup_paths = write_phantom_pair(pair, tmp_path)
    baseline, followup = build_volume(baseline_paths), build_volume(followup_paths)
    prior = [Measured.of(n) for n in detector.run(baseline).nodules]
    current = [Measured.of(n) for n in detector.run(followup).nodules]
    registration = register_rigid(followup, baseline)
    changes = compare(current, prior, registration.transform, pair.interval_days)
    rows = []
    reported = []
    for truth in pair.nodules:
        before = _nearest(prior, truth.baseline_centre_mm)
        now = _nearest(current, truth.followup_centre_mm)
        change = _change_of(changes, now, before)
        reported.append(change)
        rows.append(
            (
                truth,
                None if before is None else prior[before],
                None if now is None else current[now],
                change,
                _problems(truth, before, now, change),
            )
        )
    extra = [c for c in changes if c not in reported]
    error = _registration_error_mm(pair, registration)
    print("\n" + _table(pair, registration, error, rows, extra))
    assert error <= REGISTERED_MM
    assert not [problems for *_, problems in rows if problems]
