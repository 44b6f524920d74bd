"""Preprocessing shared by the service, training and evaluation (numpy and scipy only).

Both stages work on one resampled copy of the CT volume: isotropic voxels of
:data:`ISO_SPACING_MM`, Hounsfield units clipped to :data:`HU_WINDOW` and scaled to [0, 1].
Arrays are indexed ``[z, y, x]``; spacings are ``(dz, dy, dx)`` in millimetres; world positions
are patient LPS ``(x, y, z)`` millimetres as DICOM ImagePositionPatient (axial slices, identity
orientation).

Resampling has bounded memory: interpolating one axis at a time over the whole volume would make
temporaries of a few volumes' worth on a 300-slice 512 x 512 series, so each pass works in slabs
along an axis it does not touch and its peak is the output plus one slab. Every output voxel is
computed by the same float32 expression whatever the slab size, so results do not depend on it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]

ISO_SPACING_MM = 1.25
"""Isotropic voxel size (mm) of the grid both stages see."""

HU_WINDOW = (-1000.0, 400.0)
"""HU values are clipped to this window and mapped linearly to [0, 1]."""

STAGE1_CONTEXT = 2
"""Stage 1 sees slices ``z - 2 .. z + 2`` of the isotropic grid as five channels (2.5D)."""

STAGE2_PATCH = 32
"""Stage 2 patch edge in voxels (32 x 1.25 mm = 40 mm field of view)."""

LUNG_MARGIN_MM = 10.0
"""Candidates are kept when they lie within this distance of the air-filled lung mask."""

SLAB_VOXELS = 16_000_000
"""Voxels per slab of a linear resampling pass (about 64 MB of float32 per temporary)."""


def normalise_hu(volume_hu: npt.NDArray[np.generic]) -> FloatArray:
    """Clip HU to :data:`HU_WINDOW` and scale to [0, 1] as float32.

    Parameters
    ----------
    volume_hu : numpy.ndarray
        Any array of Hounsfield units.

    Returns
    -------
    numpy.ndarray
        Float32 array in [0, 1] with the same shape.
    """
    lo, hi = HU_WINDOW
    out = (np.asarray(volume_hu, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def iso_shape(shape: tuple[int, ...], spacing_mm: tuple[float, float, float]) -> tuple[int, ...]:
    """Return the isotropic grid shape that covers a volume of ``shape`` and ``spacing_mm``."""
    return tuple(
        max(1, int(np.floor((n - 1) * s / ISO_SPACING_MM)) + 1)
        for n, s in zip(shape, spacing_mm, strict=True)
    )


def resample_to_iso(
    volume: npt.NDArray[np.generic],
    spacing_mm: tuple[float, float, float],
    order: int = 1,
) -> FloatArray:
    """Resample ``volume`` onto the :data:`ISO_SPACING_MM` grid (voxel 0 stays at voxel 0).

    Separable linear interpolation (``order=1``, in slabs of :data:`SLAB_VOXELS`) or nearest
    neighbour (``order=0``), one axis at a time, so the cost is a few passes over the data.

    Parameters
    ----------
    volume : numpy.ndarray
        ``[z, y, x]`` array.
    spacing_mm : tuple of float
        ``(dz, dy, dx)`` of ``volume``.
    order : int
        0 for nearest neighbour (labels), 1 for linear (intensities).

    Returns
    -------
    numpy.ndarray
        Float32 array on the isotropic grid; iso voxel ``i`` lies at ``i * ISO_SPACING_MM`` from
        the original voxel 0 along each axis.
    """
    out = np.asarray(volume, dtype=np.float32)
    shape = iso_shape(out.shape, spacing_mm)
    for axis in pass_order(out.shape, spacing_mm):
        n_new, sp = shape[axis], spacing_mm[axis]
        if order == 0:
            pos = np.arange(n_new, dtype=np.float64) * ISO_SPACING_MM / sp
            idx = np.clip(np.rint(pos).astype(np.intp), 0, out.shape[axis] - 1)
            out = np.take(out, idx, axis=axis)
            continue
        out = _linear_pass(out, axis, n_new, sp)
    return np.ascontiguousarray(out, dtype=np.float32)


def pass_order(shape: tuple[int, ...], spacing_mm: tuple[float, float, float]) -> list[int]:
    """The axes in the order :func:`resample_to_iso` interpolates them: the one that shrinks most
    first, so that the later passes work on less data (linear interpolation is separable; the
    order changes the result by float32 rounding only)."""
    new = iso_shape(shape, spacing_mm)
    return sorted(range(len(shape)), key=lambda a: new[a] / shape[a])


def _linear_pass(data: FloatArray, axis: int, n_new: int, spacing: float) -> FloatArray:
    """Interpolate ``data`` along ``axis`` to ``n_new`` samples of the isotropic grid, in slabs."""
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
    w0 = 1.0 - w
    for start in range(0, data.shape[other], step):
        part = [slice(None)] * data.ndim
        part[other] = slice(start, start + step)
        src = data[tuple(part)]
        # src[i0] * (1 - w) + src[i1] * w, each operation in float32, without temporaries.
        dst = out[tuple(part)]
        np.take(src, i0, axis=axis, out=dst, mode="clip")
        dst *= w0
        upper = np.take(src, i1, axis=axis, mode="clip")
        upper *= w
        dst += upper
    return out


def lung_mask(iso_hu: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """Segment the air-filled lungs on the isotropic grid with thresholds and components.

    Voxels below -400 HU that are not connected (per slice) to the image border form the
    candidates; the largest 3D components holding at least 8 % of that air (at most three:
    two lungs and a trachea) are kept, closed and hole-filled so that vessels and nodules
    inside the lungs belong to the mask.

    Parameters
    ----------
    iso_hu : numpy.ndarray
        HU volume on the isotropic grid, ``[z, y, x]``.

    Returns
    -------
    numpy.ndarray
        Boolean lung mask, same shape.
    """
    air = np.asarray(iso_hu) < -400.0
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        lab, n = ndimage.label(air[z])
        on_border = np.zeros(n + 1, bool)
        on_border[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = True
        on_border[0] = False
        outside[z] = on_border[lab]
    inner = air & ~outside
    lab3, n = ndimage.label(inner)
    if n == 0:
        return inner
    sizes = np.bincount(lab3.ravel())[1:]
    mask = np.zeros(lab3.shape, bool)
    for i in np.argsort(sizes)[::-1][:3]:
        if sizes[i] >= 0.08 * sizes.sum():
            mask |= lab3 == i + 1
    # The closing and the hole filling run on the mask's box grown by what the closing's dilation
    # can reach (2 iterations of the 3x5x5 element: 2 slices, 4 rows and columns) and one more
    # voxel: outside it everything stays empty, so the result equals that over the whole volume.
    box = grown_box(mask, (3, 5, 5))
    if box is None:
        return mask
    closed = closing_3x5x5_twice(mask[box])
    for z in range(closed.shape[0]):
        closed[z] = ndimage.binary_fill_holes(closed[z])
    lungs = np.zeros_like(mask)
    lungs[box] = closed
    return lungs


def closing_3x5x5_twice(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``ndimage.binary_closing(mask, np.ones((3, 5, 5)), iterations=2)``, computed faster.

    Two dilations (erosions) by a box are one by the box twice as large, 5 x 9 x 9, and a binary
    dilation (erosion) by a box is a maximum (minimum) filter, which scipy runs one axis at a
    time. Outside the array both count as empty, as binary_closing's border value 0 does.
    """
    size = (5, 9, 9)
    dilated = ndimage.maximum_filter(mask, size=size, mode="constant", cval=0)
    closed: npt.NDArray[np.bool_] = ndimage.minimum_filter(
        dilated, size=size, mode="constant", cval=0
    )
    return closed


def grown_box(mask: npt.NDArray[np.bool_], grow: int | tuple[int, ...]) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``grow`` voxels (per axis), clipped to the array;
    ``None`` when ``mask`` is empty."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        if present.size == 0:
            return None
        g = grow if isinstance(grow, int) else grow[axis]
        lo.append(max(int(present[0]) - g, 0))
        hi.append(min(int(present[-1]) + g + 1, mask.shape[axis]))
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def near_lung(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Return voxels within :data:`LUNG_MARGIN_MM` of ``mask`` (juxta-pleural nodules included).

    The distance transform runs on the mask's bounding box grown by the margin only: every voxel
    outside it is farther than the margin from the mask, and every mask voxel is inside it, so the
    result is the same as over the whole volume, at a fraction of the cost.
    """
    box = grown_box(mask, int(np.ceil(LUNG_MARGIN_MM / ISO_SPACING_MM)) + 1)
    if box is None:
        return np.ones_like(mask)
    dist = ndimage.distance_transform_edt(~mask[box], sampling=ISO_SPACING_MM)
    near = np.zeros_like(mask, dtype=bool)
    near[box] = dist <= LUNG_MARGIN_MM
    return near


def near_lung_at(
    mask: npt.NDArray[np.bool_], voxels: npt.NDArray[np.intp]
) -> npt.NDArray[np.bool_]:
    """Whether each of ``voxels`` (rows of ``z, y, x`` indices) lies within
    :data:`LUNG_MARGIN_MM` of ``mask``: :func:`near_lung` at those voxels only (all when the mask
    is empty).

    The nearest mask voxel to a voxel outside the mask is on the mask's boundary (a mask voxel with
    a 6-neighbour outside it: otherwise its neighbour towards the point would be nearer), so the
    exact nearest-neighbour search runs over the boundary voxels only; the distance is the
    distance transform's expression, so the answers equal :func:`near_lung`'s.
    """
    from scipy.spatial import cKDTree

    voxels = np.asarray(voxels, dtype=np.intp).reshape(-1, 3)
    box = grown_box(mask, 1)
    if box is None:
        return np.ones(len(voxels), dtype=bool)
    near = mask[tuple(voxels.T)]
    outside = np.flatnonzero(~near)
    if outside.size == 0:
        return near
    sub = mask[box]
    # border_value=1: a mask voxel on the array's edge is not boundary because of the edge (its
    # neighbour towards any voxel of the array is inside the array).
    edge = np.argwhere(sub & ~ndimage.binary_erosion(sub, border_value=1))
    edge += np.array([s.start for s in box])
    margin_vox = LUNG_MARGIN_MM / ISO_SPACING_MM
    _, nearest = cKDTree(edge).query(voxels[outside], distance_upper_bound=margin_vox + 1.0)
    found = nearest < len(edge)
    diff = (voxels[outside[found]] - edge[nearest[found]]) * ISO_SPACING_MM
    near[outside[found]] = np.sqrt((diff**2).sum(axis=1)) <= LUNG_MARGIN_MM
    return near


def crop_patch(
    volume: npt.NDArray[np.generic], centre_vox: tuple[int, int, int], size: int, fill: float = 0.0
) -> FloatArray:
    """Cut a cube of edge ``size`` centred on ``centre_vox``, padding outside with ``fill``."""
    out = np.full((size, size, size), fill, dtype=np.float32)
    lo = [c - size // 2 for c in centre_vox]
    src = tuple(slice(max(0, a), min(n, a + size)) for a, n in zip(lo, volume.shape, strict=True))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    if all(s.stop > s.start for s in src):
        out[dst] = volume[src]
    return out
