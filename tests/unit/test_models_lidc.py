"""The shipped ONNX detector on the real series LIDC-IDRI-0001 (about 20-40 s on one core)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.evaluate import evaluate_lidc, evaluation_detector


def _data_dir() -> Path | None:
    env = os.environ.get("NODULEAI_TEST_DATA")
    if env:
        return Path(env)
    p = Path(__file__).resolve().parents[3] / "shared" / "data"
    return p if p.exists() else None


@pytest.mark.slow
def test_readers_nodule_is_found_with_at_most_two_false_positives_and_right_size() -> None:
    data = _data_dir()
    if data is None or not (data / "lidc-idri-0001").exists():
        pytest.skip("real LIDC data not available (set NODULEAI_TEST_DATA)")
    r = evaluate_lidc(evaluation_detector(threads=1), data)
    assert r is not None
    print(r["findings_at_operating_point"])
    assert r["found"]
    assert r["false_positives_at_operating_point"] <= 2
    assert abs(r["diameter_error_vs_long_axis"]) <= 0.30
