"""Build a Hounsfield-unit volume from one CT series, in the detector's canonical geometry.

The detector (:meth:`pipelines.detect.Detector.run`) wants ``hu[z, y, x]`` with slices in
increasing patient z, the array's x along patient +x (L) and y along +y (P), ``spacing_mm =
(dz, dy, dx)`` and ``origin_mm`` the LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``. This module turns a
series as stored (any file order, any transfer syntax pydicom can decode, single-frame CT Image or
multi-frame Enhanced CT) into that, and refuses with a :class:`StudyRejectedError` whenever it
cannot do so without guessing.

Geometry follows PS3.3 C.7.6.2 (Image Plane: ImagePositionPatient, ImageOrientationPatient,
PixelSpacing), C.8.2.1 (CT Image: RescaleSlope/Intercept to HU, GantryDetectorTilt) and
C.7.6.16 (Multi-frame Functional Groups: Plane Position, Plane Orientation, Pixel Measures and
Pixel Value Transformation per frame or shared).

Policy (each step noted in :attr:`Volume.corrections` when it changes anything):

* Slices are sorted by ImagePositionPatient projected on the slice normal (row cosine x column
  cosine), never by InstanceNumber.
* Duplicate positions: identical duplicates (same HU) are dropped; conflicting ones are rejected
  (``duplicate_positions``).
* A gap larger than ``max_gap_factor`` x the median spacing is a missing slice and is rejected
  (``missing_slices``) unless ``resample_gaps=True``: a hospital prefers no result to a detector
  run on a volume with an invented slice. Smaller irregularities within ``uneven_tolerance`` of the
  median are resampled to the median spacing by linear interpolation along the stack;
  beyond that the series is rejected (``uneven_spacing``).
* Gantry tilt (positions drifting in-plane along the stack, or a tilted image plane): up to
  ``max_tilt_deg`` it is corrected, by a per-slice in-plane shift when the image plane is axial,
  otherwise by an affine resampling onto an axial grid; beyond, ``gantry_tilt``.
* Axis-aligned orientations are canonicalised by flips/transposes only (no interpolation).

Rejection codes (:attr:`StudyRejectedError.code`): ``no_pixel_data``, ``no_pixel_spacing``,
``no_image_plane``, ``no_frame_of_reference``, ``mixed_series``, ``unreadable_instance``,
``undecodable_pixel_data`` (e.g. JPEG processes 6-8/10-12 without GDCM),
``unsupported_pixel_data``, ``inconsistent_geometry``, ``too_few_slices``,
``duplicate_positions``, ``missing_slices``, ``uneven_spacing``, ``gantry_tilt``, ``not_axial``.
All geometry checks run on headers before any pixel is decoded, except the duplicate check.

The steps live by concern: :mod:`pipelines.headers` (header access, per-frame records),
:mod:`pipelines.geometry` (normals, spacing plans, tilt, the canonical grid) and
:mod:`pipelines.pixels` (decoding and rescale); this module applies the policy above.

Memory: headers are read with pixel data deferred, then frames are decoded one at a time into a
preallocated float32 array that becomes :attr:`Volume.hu` (int16 to float32 once); flips are done
slice by slice in place. Peak is about one volume (300 x 512 x 512: 300 MiB), two when
resampling (uneven spacing, tilted planes) or transposing a non-square matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset

from dicom_node.errors import RejectionCode, StudyRejectedError
from pipelines.geometry import (
    SAME_POSITION_MM,
    Canonical,
    Vec,
    check_consistent,
    check_tilt,
    fit_drift,
    plan_spacing,
    resample_stack,
    sort_frames,
    stack_normal,
    to_canonical,
)
from pipelines.headers import FrameHeader, header_tilt, read_headers
from pipelines.pixels import FloatArray, load_stack, read_hu


@dataclass(frozen=True)
class SourceFrame:
    """The stored frame an output slice was taken from.

    Attributes
    ----------
    sop_instance_uid : str
        SOPInstanceUID of the source instance.
    frame_number : int or None
        1-based frame number in a multi-frame instance (PS3.3 C.7.6.16), None for single-frame.
    """

    sop_instance_uid: str
    frame_number: int | None


@dataclass
class Volume:
    """An axial HU volume in canonical LPS orientation.

    Attributes
    ----------
    hu : numpy.ndarray
        float32 ``[z, y, x]`` Hounsfield units (RescaleSlope/Intercept applied per frame), slices
        in increasing patient z, x towards patient left, y towards posterior.
    spacing_mm : tuple of float
        ``(dz, dy, dx)`` in mm.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``; voxel ``[k, j, i]`` lies at
        ``origin + (i dx, j dy, k dz)``.
    series_instance_uid, study_instance_uid, frame_of_reference_uid : str
        As stored ("" when the files lack them).
    sop_instance_uids : list of str
        Every source instance used, in z order of its first frame.
    source_positions : list of SourceFrame or None
        Per output slice, the stored frame it is (after in-plane flips or shifts only), or None when
        the slice was interpolated (resampling).
    orientation : tuple of float
        The six direction cosines of the *source* (ImageOrientationPatient).
    corrections : list of str
        Machine-readable notes of what was changed or should be known, each ``name`` or
        ``name:detail``: ``duplicate_dropped:<SOPInstanceUID>``, ``resampled_uneven_spacing:<mm>``,
        ``resampled_missing_slices:<mm>``, ``gantry_tilt_corrected:<deg>deg``,
        ``resampled_to_axial_grid:tilt=<deg>deg,plane=<deg>deg``, ``flipped_row_direction``,
        ``flipped_column_direction``, ``transposed_rows_columns``, ``lossy_compressed_source``.
    pixel_spacing : tuple of float
        Source PixelSpacing (row spacing, column spacing) in mm.
    slice_thickness : float or None
        Source SliceThickness in mm.
    rows, columns : int
        Source matrix size.
    """

    hu: FloatArray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    source_positions: list[SourceFrame | None]
    orientation: tuple[float, float, float, float, float, float]
    corrections: list[str] = field(default_factory=list)
    pixel_spacing: tuple[float, float] = (0.0, 0.0)
    slice_thickness: float | None = None
    rows: int = 0
    columns: int = 0


def _source(frame: FrameHeader) -> SourceFrame:
    """The reference kept for a stored frame in :attr:`Volume.source_positions`."""
    number = None if frame.frame_index is None else frame.frame_index + 1
    return SourceFrame(frame.sop_instance_uid, number)


def build_volume(
    paths: Sequence[Path],
    *,
    min_slices: int = 3,
    max_gap_factor: float = 1.5,
    uneven_tolerance: float = 0.5,
    resample_gaps: bool = False,
    max_tilt_deg: float = 30.0,
) -> Volume:
    """Build the canonical HU volume of one series.

    Parameters
    ----------
    paths : sequence of Path
        The instances of one series (any order; single-frame CT Image or multi-frame Enhanced CT).
    min_slices : int
        Fewest distinct slice positions accepted (``too_few_slices`` below); the geometric floor
        is 3, series selection enforces the practical minimum. Values below 3 are meant for tests
        of tiny multi-frame objects.
    max_gap_factor : float
        A spacing more than this times the median is a missing slice (``missing_slices``).
    uneven_tolerance : float
        Spacings within this fraction of the median (and under ``max_gap_factor``) are resampled
        to the median; larger deviations are rejected (``uneven_spacing``).
    resample_gaps : bool
        Interpolate across missing slices instead of rejecting (off by default).
    max_tilt_deg : float
        Largest gantry tilt corrected; beyond it ``gantry_tilt``.

    Returns
    -------
    Volume
        See :class:`Volume`.

    Raises
    ------
    StudyRejectedError
        With code ``no_pixel_data``, ``no_pixel_spacing``, ``no_image_plane``,
        ``no_frame_of_reference``, ``unreadable_instance``, ``undecodable_pixel_data``,
        ``unsupported_pixel_data``, ``inconsistent_geometry``, ``too_few_slices``,
        ``duplicate_positions``, ``missing_slices``, ``uneven_spacing``, ``gantry_tilt``,
        ``not_axial`` or ``mixed_series``.
    """
    frames, first, lossy = read_headers(paths)
    for_uid = str(first.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise StudyRejectedError(
            RejectionCode.NO_FRAME_OF_REFERENCE,
            "no FrameOfReferenceUID: positions are not anchored to the patient (PS3.3 C.7.4.1)",
        )
    check_consistent(frames)
    normal = stack_normal(frames[0].orientation)
    corrections: list[str] = ["lossy_compressed_source"] if lossy else []
    frames = _drop_duplicates(sort_frames(frames, normal), normal, corrections)
    if len(frames) < max(1, min_slices):
        raise StudyRejectedError(
            RejectionCode.TOO_FEW_SLICES,
            f"{len(frames)} distinct slice positions, at least {min_slices} needed",
        )
    heights = np.array([np.dot(f.position, normal) for f in frames])
    plan = plan_spacing(heights, max_gap_factor, uneven_tolerance, resample_gaps)
    drift = fit_drift(frames, normal, heights)
    check_tilt(drift, frames[0], header_tilt(first), max_tilt_deg, corrections)
    stack, exact = resample_stack(load_stack(frames), heights, plan, corrections)
    sources = [None if k is None else _source(frames[k]) for k in exact]
    volume = to_canonical(stack, frames[0], normal, plan.spacing, drift, corrections)
    return _finish(volume, sources, frames, first, for_uid, corrections)


def _finish(
    volume: Canonical,
    sources: list[SourceFrame | None],
    frames: Sequence[FrameHeader],
    first: Dataset,
    for_uid: str,
    corrections: list[str],
) -> Volume:
    hu, spacing, origin, keeps_slices = volume
    if not keeps_slices:
        sources = [None] * hu.shape[0]
    uids = list(dict.fromkeys(frame.sop_instance_uid for frame in frames))
    head = frames[0]
    return Volume(
        hu=hu,
        spacing_mm=spacing,
        origin_mm=origin,
        series_instance_uid=str(first.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=for_uid,
        sop_instance_uids=uids,
        source_positions=sources,
        orientation=head.orientation,
        corrections=corrections,
        pixel_spacing=head.pixel_spacing,
        slice_thickness=head.slice_thickness,
        rows=head.rows,
        columns=head.columns,
    )


def _drop_duplicates(
    frames: list[FrameHeader], normal: Vec, corrections: list[str]
) -> list[FrameHeader]:
    """Drop identical duplicate positions; reject conflicting ones (PS3.3 C.7.6.2.1.1)."""
    kept: list[FrameHeader] = [frames[0]]
    for frame in frames[1:]:
        previous = kept[-1]
        if (
            abs(float(np.dot(np.subtract(frame.position, previous.position), normal)))
            > SAME_POSITION_MM
        ):
            kept.append(frame)
            continue
        if not _same_pixels(previous, frame):
            z = float(np.dot(frame.position, normal))
            raise StudyRejectedError(
                RejectionCode.DUPLICATE_POSITIONS,
                f"two different slices at the same position ({z:.2f} mm along the "
                f"normal): {previous.sop_instance_uid} and {frame.sop_instance_uid}",
            )
        corrections.append(f"duplicate_dropped:{frame.sop_instance_uid}")
    return kept


def _same_pixels(a: FrameHeader, b: FrameHeader) -> bool:
    if not np.allclose(a.position, b.position, atol=SAME_POSITION_MM):
        return False
    return bool(
        np.array_equal(
            read_hu(a.path, a.frame_index, a.slope, a.intercept),
            read_hu(b.path, b.frame_index, b.slope, b.intercept),
        )
    )
