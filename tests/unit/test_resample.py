"""The service's bounded-memory resampling equals the training-time definition bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from models.preprocessing import resample_to_iso as training_resample
from pipelines import resample


@pytest.mark.parametrize("spacing", [(2.5, 0.703, 0.703), (1.0, 0.6, 0.9), (0.625, 1.25, 1.25)])
def test_slab_resampling_equals_the_training_resampling_exactly(
    spacing: tuple[float, float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resample, "SLAB_VOXELS", 5_000)  # force many slabs on a small volume
    volume = np.random.default_rng(1).integers(-1024, 2000, (23, 61, 47)).astype(np.int16)
    ours = resample.resample_to_iso(volume, spacing)
    theirs = training_resample(volume, spacing)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
