"""Bounded-memory resampling equals whole-volume separable interpolation bit for bit (in the same
order of axes), and the order of axes changes it by float32 rounding only."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from pipelines import preprocess


def _whole_volume(
    volume: npt.NDArray[np.int16], spacing: tuple[float, float, float], axes: list[int]
) -> npt.NDArray[np.float32]:
    """One pass per axis over the whole volume, in the order ``axes`` (the models were trained
    with z, y, x)."""
    out = np.asarray(volume, dtype=np.float32)
    new_shape = preprocess.iso_shape(out.shape, spacing)
    for axis in axes:
        n_new, sp = new_shape[axis], spacing[axis]
        pos = np.arange(n_new, dtype=np.float64) * preprocess.ISO_SPACING_MM / sp
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, out.shape[axis] - 1)
        i1 = np.minimum(i0 + 1, out.shape[axis] - 1)
        shape = [1] * out.ndim
        shape[axis] = n_new
        w = (pos - i0).astype(np.float32).reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return np.ascontiguousarray(out, dtype=np.float32)


@pytest.mark.parametrize("spacing", [(2.5, 0.703, 0.703), (1.0, 0.6, 0.9), (0.625, 1.25, 1.25)])
def test_slab_resampling_equals_whole_volume_resampling_exactly(
    spacing: tuple[float, float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess, "SLAB_VOXELS", 5_000)  # force many slabs on a small volume
    volume = np.random.default_rng(1).integers(-1024, 2000, (23, 61, 47)).astype(np.int16)
    ours = preprocess.resample_to_iso(volume, spacing)
    theirs = _whole_volume(volume, spacing, preprocess.pass_order(volume.shape, spacing))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("spacing", [(2.5, 0.703, 0.703), (1.0, 0.6, 0.9), (0.625, 1.25, 1.25)])
def test_the_order_of_axes_changes_the_result_by_rounding_only(
    spacing: tuple[float, float, float],
) -> None:
    volume = np.random.default_rng(2).integers(-1024, 3000, (23, 61, 47)).astype(np.int16)
    ours = preprocess.resample_to_iso(volume, spacing)
    trained = _whole_volume(volume, spacing, [0, 1, 2])
    assert np.abs(ours - trained).max() <= 1e-3  # HU, on values up to 3000


def test_the_axis_that_shrinks_most_is_interpolated_first() -> None:
    # a thick-slice CT: z grows (2.5 -> 1.25 mm), y and x shrink (0.7 -> 1.25 mm)
    assert preprocess.pass_order((133, 512, 512), (2.5, 0.7, 0.7)) == [1, 2, 0]
    assert preprocess.pass_order((300, 400, 512), (0.6, 0.9, 0.7)) == [0, 2, 1]
