"""The shipped ONNX detector on the real series LIDC-IDRI-0001, and on its copy moved and
resampled as the priors test sends it (about 20-40 s each on one core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.evaluate import evaluate_lidc, evaluation_detector
from models.followup import LIDC_TEST_MOTION
from pipelines.registration import RigidTransform


@pytest.mark.slow
@pytest.mark.parametrize("motion", [None, LIDC_TEST_MOTION], ids=["as-scanned", "moved"])
def test_readers_nodule_is_found_with_at_most_two_false_positives_and_right_size(
    shared_data: Path, motion: RigidTransform | None
) -> None:
    r = evaluate_lidc(evaluation_detector(threads=1), shared_data, motion)
    assert r is not None
    print(r["findings_at_operating_point"])
    assert r["found"]
    assert r["false_positives_at_operating_point"] <= 2
    assert abs(r["diameter_error_vs_long_axis"]) <= 0.30
