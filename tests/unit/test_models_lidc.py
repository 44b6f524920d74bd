"""The shipped ONNX detector on the shared real series (issue 17's must-shows 1 and 2):
LIDC-IDRI-0001, as scanned and moved and resampled as the priors test sends it, and the COVID-19
scan without nodules (about 20-40 s each on one core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.evaluate import (
    NEGATIVE_SERIES,
    evaluate_lidc,
    evaluate_negative_series,
    evaluation_detector,
)
from models.followup import LIDC_TEST_MOTION
from pipelines.manifest import WEIGHTS_DIR
from pipelines.registration import RigidTransform


@pytest.mark.slow
@pytest.mark.parametrize("motion", [None, LIDC_TEST_MOTION], ids=["as-scanned", "moved"])
def test_readers_nodule_is_found_with_at_most_one_false_positive_and_right_size(
    shared_data: Path, motion: RigidTransform | None
) -> None:
    r = evaluate_lidc(evaluation_detector(threads=1), shared_data, motion)
    assert r is not None
    print(r["findings_at_operating_point"])
    assert r["found"]
    assert r["false_positives_at_operating_point"] <= 1
    assert abs(r["diameter_error_vs_long_axis"]) <= 0.15


@pytest.mark.slow
def test_pneumonia_is_not_reported_as_nodules_or_masses(shared_data: Path) -> None:
    if not (shared_data / NEGATIVE_SERIES).is_dir():
        pytest.skip(f"{NEGATIVE_SERIES} not available")
    r = evaluate_negative_series(WEIGHTS_DIR, shared_data, threads=1)
    assert r is not None
    print(r["each"])
    assert r["findings"] <= 2
    assert r["over_30_mm"] == 0
