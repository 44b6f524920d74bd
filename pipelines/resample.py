"""Isotropic resampling with bounded memory, bit for bit what the models were trained with.

:func:`models.preprocessing.resample_to_iso` (the training-time definition) interpolates one axis
at a time over the whole volume; on a 300-slice 512 x 512 series its temporaries alone reach a few
volumes' worth of memory. This does the same arithmetic element by element, in slabs along an
axis the pass does not touch, so its peak is the output plus one slab. Every output voxel is
computed by the same float32 expression as in training, so results are identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from models.preprocessing import ISO_SPACING_MM, iso_shape

FloatArray = npt.NDArray[np.float32]

#: Voxels per slab of a pass (about 64 MB of float32 per temporary).
SLAB_VOXELS = 16_000_000


def resample_to_iso(volume: npt.NDArray[Any], spacing_mm: tuple[float, float, float]) -> FloatArray:
    """Linear resampling onto the :data:`ISO_SPACING_MM` grid (voxel 0 stays at voxel 0)."""
    out = np.asarray(volume, dtype=np.float32)
    for axis, n_new in enumerate(iso_shape(out.shape, spacing_mm)):
        out = _linear_pass(out, axis, n_new, spacing_mm[axis])
    return np.ascontiguousarray(out, dtype=np.float32)


def _linear_pass(data: FloatArray, axis: int, n_new: int, spacing: float) -> FloatArray:
    """Interpolate ``data`` along ``axis`` to ``n_new`` samples of the isotropic grid."""
    pos = np.arange(n_new, dtype=np.float64) * ISO_SPACING_MM / spacing
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, data.shape[axis] - 1)
    i1 = np.minimum(i0 + 1, data.shape[axis] - 1)
    shape = [1] * data.ndim
    shape[axis] = n_new
    w = (pos - i0).astype(np.float32).reshape(shape)
    new_shape = list(data.shape)
    new_shape[axis] = n_new
    out = np.empty(new_shape, dtype=np.float32)
    other = max((a for a in range(data.ndim) if a != axis), key=lambda a: data.shape[a])
    per_index = max(1, int(np.prod(new_shape)) // new_shape[other])
    step = max(1, SLAB_VOXELS // per_index)
    for start in range(0, data.shape[other], step):
        part = [slice(None)] * data.ndim
        part[other] = slice(start, start + step)
        src = data[tuple(part)]
        out[tuple(part)] = np.take(src, i0, axis=axis) * (1.0 - w) + np.take(src, i1, axis=axis) * w
    return out
