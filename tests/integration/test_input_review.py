"""An unfamiliar input (pipelines.inputcheck): every finding of the real detector needs review."""

from __future__ import annotations

import pytest

from models.phantom import make_phantom
from pipelines.detect import Detector, DetectorConfig

pytestmark = pytest.mark.integration


def test_every_finding_needs_review_when_the_input_is_unfamiliar() -> None:
    ph = make_phantom(5, spacing_mm=(2.0, 0.7, 0.7), n_nodules=3)
    detector = Detector(DetectorConfig(backend="onnx-cpu", threads=2))
    familiar = detector.detect(ph.volume_hu, ph.spacing_mm, ph.origin_mm, "1.2.3", 2.0)
    assert familiar.input_review == ()
    assert familiar.nodules, "the phantom's nodules should be found"
    assert not all(n.needs_review for n in familiar.nodules)
    resampled = detector.detect(
        ph.volume_hu, ph.spacing_mm, ph.origin_mm, "1.2.3", 2.0, ["resampled_missing_slices:2"]
    )
    assert resampled.input_review == ("resampled_missing_slices:2",)
    assert [n.center_mm for n in resampled.nodules] == [n.center_mm for n in familiar.nodules]
    assert all(n.needs_review for n in resampled.nodules)
