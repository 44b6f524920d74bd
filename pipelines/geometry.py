"""Slice geometry of a CT series: normals, spacing, gantry tilt and the canonical LPS grid.

Geometry follows PS3.3 C.7.6.2 (Image Plane: ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) and C.8.2.1 (CT Image: GantryDetectorTilt). Everything here works on
:class:`~pipelines.headers.FrameHeader` records and decoded stacks; the policy that combines the
steps (and the rejection codes it raises) is described in :mod:`pipelines.volume`.

* Slice normal: row cosine x column cosine; slices are sorted along it, signed towards +z.
* Spacing plan (:func:`plan_spacing`): uniform, resample to the median spacing
  (:func:`resample_stack`), or reject (``missing_slices``, ``uneven_spacing``).
* Drift (:func:`fit_drift`): in-plane lean of the stack (gantry tilt), checked against the limit by
  :func:`check_tilt`.
* Canonical grid (:func:`to_canonical`): flips/transposes for axis-aligned planes, per-slice
  in-plane shifts for a leaning axial stack, trilinear affine resampling otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.errors import RejectionCode, StudyRejectedError
from pipelines.headers import FrameHeader

FloatArray = npt.NDArray[np.float32]
Vec = npt.NDArray[np.float64]

#: HU written where a correction moves data in from outside the scanned field (air).
FILL_HU = -1024.0
#: Off-axis cosine components up to this count as axis-aligned (0.3 degrees: 1.3 mm at 250 mm).
AXIS_ALIGNED_TOL = 0.005
#: Two positions closer than this (mm, along the normal) are the same position.
SAME_POSITION_MM = 0.01
#: Spacing deviations below this (mm) are float noise in the header, not unevenness.
SPACING_NOISE_MM = 0.02
#: In-plane drift below this fraction of a pixel over the whole stack is no tilt.
DRIFT_NOISE_PX = 0.1
#: Tilt-corrected geometry must fit a straight stack to within this fraction of a pixel.
DRIFT_RESIDUAL_PX = 0.5


def slice_normal(orientation: Sequence[float]) -> Vec:
    """Unit normal of the image plane: row cosine x column cosine (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0 else normal


def axial_angle_deg(orientation: Sequence[float]) -> float:
    """Angle in degrees between the slice normal and the patient z axis."""
    nz = abs(float(slice_normal(orientation)[2]))
    return math.degrees(math.acos(min(1.0, nz)))


def check_consistent(frames: Sequence[FrameHeader]) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise StudyRejectedError(
                RejectionCode.INCONSISTENT_GEOMETRY, "rows/columns differ between slices"
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=1e-3):
            raise StudyRejectedError(
                RejectionCode.INCONSISTENT_GEOMETRY, "PixelSpacing differs between slices"
            )
        if not np.allclose(frame.orientation, first.orientation, atol=1e-3):
            raise StudyRejectedError(
                RejectionCode.INCONSISTENT_GEOMETRY,
                "ImageOrientationPatient differs between slices",
            )
    if first.rows <= 0 or first.columns <= 0:
        raise StudyRejectedError(RejectionCode.INCONSISTENT_GEOMETRY, "Rows/Columns missing")
    norm = np.linalg.norm(np.asarray(first.orientation).reshape(2, 3), axis=1)
    if (
        not np.allclose(norm, 1.0, atol=1e-2)
        or float(np.linalg.norm(slice_normal(first.orientation))) < 0.99
    ):
        raise StudyRejectedError(
            RejectionCode.INCONSISTENT_GEOMETRY, "ImageOrientationPatient is not two unit vectors"
        )


def stack_normal(orientation: Sequence[float]) -> Vec:
    """Slice normal signed so that it points towards patient +z (superior)."""
    normal = slice_normal(orientation)
    return -normal if normal[2] < 0 else normal


def sort_frames(frames: Sequence[FrameHeader], normal: Vec) -> list[FrameHeader]:
    return sorted(frames, key=lambda f: float(np.dot(f.position, normal)))


@dataclass(frozen=True)
class SpacingPlan:
    """What to do with the spacing along the stack: the spacing used, whether to resample onto
    it, and the correction noted when resampling (``resampled_uneven_spacing`` or
    ``resampled_missing_slices``)."""

    spacing: float
    resample: bool
    reason: str


def plan_spacing(
    heights: npt.NDArray[np.float64],
    max_gap_factor: float,
    uneven_tolerance: float,
    resample_gaps: bool,
) -> SpacingPlan:
    """Decide between uniform, resample and reject from the positions along the normal."""
    if len(heights) < 2:
        return SpacingPlan(1.0, False, "")
    steps = np.diff(heights)
    median = float(np.median(steps))
    deviation = np.abs(steps - median)
    if float(deviation.max()) <= SPACING_NOISE_MM + 0.01 * median:
        return SpacingPlan(median, False, "")
    worst = int(np.argmax(steps))
    if steps[worst] > max_gap_factor * median:
        if not resample_gaps:
            raise StudyRejectedError(
                RejectionCode.MISSING_SLICES,
                f"a {steps[worst]:.2f} mm gap between slices at "
                f"{heights[worst]:.2f} and {heights[worst + 1]:.2f} mm (median "
                f"spacing {median:.2f} mm): slices are missing",
            )
        return SpacingPlan(median, True, "resampled_missing_slices")
    if float(deviation.max()) > uneven_tolerance * median:
        raise StudyRejectedError(
            RejectionCode.UNEVEN_SPACING,
            f"slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm "
            f"(median {median:.2f} mm)",
        )
    return SpacingPlan(median, True, "resampled_uneven_spacing")


def resample_stack(
    stack: FloatArray,
    heights: npt.NDArray[np.float64],
    plan: SpacingPlan,
    corrections: list[str],
) -> tuple[FloatArray, list[int | None]]:
    """Linear interpolation along the stack onto the median spacing (when planned).

    Returns the stack and, per output slice, the index of the stored slice it is exactly (None
    for an interpolated slice).
    """
    exact: list[int | None] = list(range(len(heights)))
    if not plan.resample:
        return stack, exact
    count = math.floor((heights[-1] - heights[0]) / plan.spacing + 0.5) + 1
    targets = heights[0] + plan.spacing * np.arange(count)
    out = np.empty((count, *stack.shape[1:]), dtype=np.float32)
    exact = []
    for k, target in enumerate(targets):
        upper = int(np.clip(np.searchsorted(heights, target), 1, len(heights) - 1))
        lower = upper - 1
        weight = float((target - heights[lower]) / (heights[upper] - heights[lower]))
        weight = min(1.0, max(0.0, weight))
        np.multiply(stack[lower], np.float32(1.0 - weight), out=out[k])
        out[k] += np.float32(weight) * stack[upper]
        exact.append(_exact_index(heights, target, plan.spacing))
    corrections.append(f"{plan.reason}:{plan.spacing:.4g}")
    return out, exact


def _exact_index(heights: npt.NDArray[np.float64], target: float, spacing: float) -> int | None:
    nearest = int(np.argmin(np.abs(heights - target)))
    if abs(heights[nearest] - target) <= 1e-3 * spacing:
        return nearest
    return None


Canonical = tuple[FloatArray, tuple[float, float, float], tuple[float, float, float], bool]
"""``(hu, spacing_mm, origin_mm, keeps_slices)``: the stack on the canonical grid, and whether its
slices are still the stored ones (flips and in-plane shifts) rather than resampled."""


@dataclass(frozen=True)
class Drift:
    """In-plane offset of each slice from the first, along the row and column cosines (mm).

    ``per_mm`` is the fitted drift per mm of height along the normal; ``at`` interpolates the
    measured drift at any height (exact at the stored slices).
    """

    heights: npt.NDArray[np.float64]
    along_row: npt.NDArray[np.float64]
    along_col: npt.NDArray[np.float64]
    per_mm: tuple[float, float]

    def at(self, height: float) -> tuple[float, float]:
        return (
            float(np.interp(height, self.heights, self.along_row)),
            float(np.interp(height, self.heights, self.along_col)),
        )

    @property
    def angle_deg(self) -> float:
        return math.degrees(math.atan(math.hypot(*self.per_mm)))


def fit_drift(
    frames: Sequence[FrameHeader], normal: Vec, heights: npt.NDArray[np.float64]
) -> Drift:
    """Measure how the stack leans: in-plane position drift versus height (gantry tilt).

    Raises
    ------
    StudyRejectedError
        ``inconsistent_geometry`` when the positions do not lie on a straight line.
    """
    head = frames[0]
    row = np.asarray(head.orientation[:3])
    col = np.asarray(head.orientation[3:])
    offsets = np.array([np.subtract(f.position, head.position) for f in frames])
    along_row, along_col = offsets @ row, offsets @ col
    rel = heights - heights[0]
    if len(frames) < 2 or rel[-1] <= 0:
        return Drift(heights, along_row, along_col, (0.0, 0.0))
    per_mm = (
        float(np.dot(rel, along_row) / np.dot(rel, rel)),
        float(np.dot(rel, along_col) / np.dot(rel, rel)),
    )
    residual = max(
        float(np.abs(along_row - per_mm[0] * rel).max() / head.pixel_spacing[1]),
        float(np.abs(along_col - per_mm[1] * rel).max() / head.pixel_spacing[0]),
    )
    if residual > DRIFT_RESIDUAL_PX:
        raise StudyRejectedError(
            RejectionCode.INCONSISTENT_GEOMETRY,
            f"slice positions wander in-plane by up to {residual:.1f} pixels off a straight stack",
        )
    return Drift(heights, along_row, along_col, per_mm)


def _has_drift(drift: Drift, head: FrameHeader) -> bool:
    span = float(drift.heights[-1] - drift.heights[0])
    pixels = (
        abs(drift.per_mm[0]) * span / head.pixel_spacing[1]
        + abs(drift.per_mm[1]) * span / head.pixel_spacing[0]
    )
    return pixels > DRIFT_NOISE_PX


def check_tilt(
    drift: Drift,
    head: FrameHeader,
    header_tilt: float,
    max_tilt_deg: float,
    corrections: list[str],
) -> None:
    """Reject tilts beyond the limit before any pixel is decoded.

    The geometry (ImagePositionPatient/ImageOrientationPatient) is authoritative; a
    GantryDetectorTilt that the geometry does not show is only noted.
    """
    tilt = drift.angle_deg
    oblique = axial_angle_deg(head.orientation)
    if tilt > max_tilt_deg:
        raise StudyRejectedError(
            RejectionCode.GANTRY_TILT,
            f"gantry tilt of {tilt:.1f} degrees exceeds {max_tilt_deg:.0f} degrees",
        )
    if oblique > max_tilt_deg:
        raise StudyRejectedError(
            RejectionCode.NOT_AXIAL, f"image plane is {oblique:.1f} degrees from axial"
        )
    if abs(header_tilt) > 0.5 and max(tilt, oblique) < 0.5:
        corrections.append(f"gantry_tilt_attribute_only:{header_tilt:.2f}deg")


def _axis_layout(orientation: Sequence[float]) -> tuple[int, int, int, int] | None:
    """For axis-aligned axial planes: (row axis, row sign, column axis, column sign).

    Axes are 0 for patient x and 1 for patient y; None when the plane is not axis-aligned
    within ``AXIS_ALIGNED_TOL`` (off-axis cosine components).
    """
    row = np.asarray(orientation[:3])
    col = np.asarray(orientation[3:6])
    row_axis, col_axis = int(np.argmax(np.abs(row))), int(np.argmax(np.abs(col)))
    if {row_axis, col_axis} != {0, 1}:
        return None
    off_row = np.delete(np.abs(row), row_axis).max()
    off_col = np.delete(np.abs(col), col_axis).max()
    if max(off_row, off_col) > AXIS_ALIGNED_TOL:
        return None
    return row_axis, int(np.sign(row[row_axis])), col_axis, int(np.sign(col[col_axis]))


def to_canonical(
    stack: FloatArray,
    head: FrameHeader,
    normal: Vec,
    spacing: float,
    drift: Drift,
    corrections: list[str],
) -> Canonical:
    """Put the stack on the canonical LPS grid (flips, in-plane shifts or affine resampling)."""
    layout = _axis_layout(head.orientation)
    if layout is None:
        return _affine_resample(stack, head, normal, spacing, drift, corrections)
    if _has_drift(drift, head):
        _shift_slices(stack, head, spacing, drift)
        corrections.append(f"gantry_tilt_corrected:{drift.angle_deg:.2f}deg")
    return _flip_axis_aligned(stack, head, layout, spacing, corrections)


def _shift_slices(stack: FloatArray, head: FrameHeader, spacing: float, drift: Drift) -> None:
    """Shear a leaning stack back in-plane, slice by slice (``scipy.ndimage.shift``), in place."""
    buffer = np.empty(stack.shape[1:], dtype=np.float32)
    height0 = float(drift.heights[0])
    for k in range(stack.shape[0]):
        along_row, along_col = drift.at(height0 + k * spacing)
        offset = (along_col / head.pixel_spacing[0], along_row / head.pixel_spacing[1])
        if max(abs(offset[0]), abs(offset[1])) < 1e-3:
            continue
        ndimage.shift(stack[k], offset, output=buffer, order=1, mode="constant", cval=FILL_HU)
        stack[k] = buffer


def _flip_axis_aligned(
    stack: FloatArray,
    head: FrameHeader,
    layout: tuple[int, int, int, int],
    spacing: float,
    corrections: list[str],
) -> Canonical:
    """Flip/transpose an axis-aligned stack so that x, y, z increase along L, P, S."""
    row_axis, row_sign, _col_axis, col_sign = layout
    row = np.asarray(head.orientation[:3])
    col = np.asarray(head.orientation[3:])
    origin = np.asarray(head.position, dtype=np.float64)
    d_row, d_col = head.pixel_spacing
    if row_sign < 0:
        origin = origin + (head.columns - 1) * d_col * row
        corrections.append("flipped_row_direction")
    if col_sign < 0:
        origin = origin + (head.rows - 1) * d_row * col
        corrections.append("flipped_column_direction")
    dy, dx = d_row, d_col
    if row_axis == 1:
        dy, dx = d_col, d_row
        corrections.append("transposed_rows_columns")
    hu = _reorient_in_place(stack, row_sign < 0, col_sign < 0, row_axis == 1)
    return hu, (spacing, dy, dx), (float(origin[0]), float(origin[1]), float(origin[2])), True


def _reorient_in_place(
    stack: FloatArray, flip_columns: bool, flip_rows: bool, transpose: bool
) -> FloatArray:
    """Flip (and transpose) every slice, one slice at a time so memory stays one volume.

    Only a transpose of a non-square matrix needs a second whole array.
    """
    if not (flip_columns or flip_rows or transpose):
        return stack
    square = stack.shape[1] == stack.shape[2]
    if transpose and not square:
        steps = (
            slice(None),
            slice(None, None, -1 if flip_rows else 1),
            slice(None, None, -1 if flip_columns else 1),
        )
        return np.ascontiguousarray(stack[steps].transpose(0, 2, 1))
    for k in range(stack.shape[0]):
        plane = stack[k]
        if flip_columns:
            plane = plane[:, ::-1]
        if flip_rows:
            plane = plane[::-1, :]
        stack[k] = (plane.T if transpose else plane).copy()
    return stack


def _affine_resample(
    stack: FloatArray,
    head: FrameHeader,
    normal: Vec,
    spacing: float,
    drift: Drift,
    corrections: list[str],
) -> Canonical:
    """Resample a tilted or oblique lattice onto an axis-aligned LPS grid (trilinear).

    The source voxel ``[k, j, i]`` lies at ``P0 + k*step + j*dr*col + i*dc*row`` where ``step``
    includes the in-plane lean of the stack; the target grid keeps the in-plane pixel spacing and
    the stack's advance along patient z, and covers the source's bounding box.
    """
    row = np.asarray(head.orientation[:3])
    col = np.asarray(head.orientation[3:])
    d_row, d_col = head.pixel_spacing
    step = spacing * (normal + drift.per_mm[0] * row + drift.per_mm[1] * col)
    matrix = np.column_stack([step, d_row * col, d_col * row])
    origin = np.asarray(head.position, dtype=np.float64)
    shape_src = np.array(stack.shape) - 1
    corners = np.array(
        [
            [k, j, i]
            for k in (0, shape_src[0])
            for j in (0, shape_src[1])
            for i in (0, shape_src[2])
        ],
        dtype=np.float64,
    )
    world = origin + corners @ matrix.T
    low, high = world.min(axis=0), world.max(axis=0)
    target = np.array([min(d_row, d_col), min(d_row, d_col), abs(float(step[2]))])
    size = np.floor((high - low) / target + 1e-6).astype(int) + 1
    inverse = np.linalg.inv(matrix)
    out = np.empty((size[2], size[1], size[0]), dtype=np.float32)
    ys, xs = np.meshgrid(
        np.arange(size[1]) * target[1], np.arange(size[0]) * target[0], indexing="ij"
    )
    plane = np.stack([xs, ys, np.zeros_like(xs)], axis=-1) + (low - origin)
    for z in range(size[2]):
        points = plane + np.array([0.0, 0.0, z * target[2]])
        coords = np.moveaxis(points @ inverse.T, -1, 0)
        ndimage.map_coordinates(
            stack, coords, output=out[z], order=1, mode="constant", cval=FILL_HU
        )
    corrections.append(
        f"resampled_to_axial_grid:tilt={drift.angle_deg:.2f}deg,"
        f"plane={axial_angle_deg(head.orientation):.2f}deg"
    )
    spacing_out = (float(target[2]), float(target[1]), float(target[0]))
    return out, spacing_out, (float(low[0]), float(low[1]), float(low[2])), False
