"""Build a Hounsfield-unit volume from one CT series, in the detector's canonical geometry.

The detector (:meth:`models.infer.NoduleDetector.detect`) wants ``hu[z, y, x]`` with slices in
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

Memory: headers are read with pixel data deferred, then frames are decoded one at a time into a
preallocated float32 array that becomes :attr:`Volume.hu` (int16 to float32 once); flips are done
slice by slice in place. Peak is about one volume (300 x 512 x 512: 300 MiB), two when
resampling (uneven spacing, tilted planes) or transposing a non-square matrix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import iter_pixels, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian
from scipy import ndimage

from dicom_node.errors import StudyRejectedError

log = logging.getLogger(__name__)

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

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


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


@dataclass(frozen=True)
class FrameHeader:
    """Geometry and rescale of one stored frame (PS3.3 C.7.6.2, C.8.2.1, C.7.6.16)."""

    path: Path
    sop_instance_uid: str
    frame_index: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int

    @property
    def source(self) -> SourceFrame:
        """The reference kept for this frame in :attr:`Volume.source_positions`."""
        number = None if self.frame_index is None else self.frame_index + 1
        return SourceFrame(self.sop_instance_uid, number)


# --------------------------------------------------------------------------- header access


def sop_class_uid(ds: Dataset) -> str:
    """SOPClassUID, falling back to the file meta MediaStorageSOPClassUID when empty."""
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def sop_instance_uid(ds: Dataset) -> str:
    """SOPInstanceUID, falling back to the file meta MediaStorageSOPInstanceUID when empty."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames for multi-frame instances, 1 otherwise."""
    value = ds.get("NumberOfFrames")
    return int(value) if value not in (None, "") else 1


def is_multiframe(ds: Dataset) -> bool:
    """True for instances whose geometry lives in functional groups (PS3.3 C.7.6.16)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def frame_attr(ds: Dataset, index: int | None, sequence: str, keyword: str) -> Any:
    """An attribute of one frame: per-frame group, then shared group, then the top level.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    index : int or None
        0-based frame index; None for single-frame instances.
    sequence : str
        Functional group macro keyword, e.g. ``PlanePositionSequence`` (PS3.3 C.7.6.16.2).
    keyword : str
        Attribute inside it, e.g. ``ImagePositionPatient``.

    Returns
    -------
    Any
        The value, or None when absent everywhere.
    """
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if index is not None and per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0] and items[0][keyword].value not in (None, ""):
            return items[0][keyword].value
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` floats from a multi-valued DS, or None when absent or malformed."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _reject(code: str, detail: str) -> StudyRejectedError:
    return StudyRejectedError(code, detail)


def frame_headers(ds: Dataset, path: Path) -> list[FrameHeader]:
    """Every frame's geometry and rescale from one instance, validated.

    Raises
    ------
    StudyRejectedError
        ``no_pixel_data``, ``no_pixel_spacing`` or ``no_image_plane`` when the instance lacks
        what PS3.3 C.7.6.2 / C.7.6.3 require to place its pixels.
    """
    name = path.name
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise _reject("no_pixel_data", f"{name} has no Pixel Data")
    multi = is_multiframe(ds)
    indices: list[int | None] = list(range(number_of_frames(ds))) if multi else [None]
    return [_frame_header(ds, path, index) for index in indices]


def _frame_header(ds: Dataset, path: Path, index: int | None) -> FrameHeader:
    name = path.name if index is None else f"{path.name} frame {index + 1}"
    spacing = _floats(frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if spacing is None or min(spacing) <= 0:
        raise _reject("no_pixel_spacing", f"{name} has no usable PixelSpacing")
    position = _floats(frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
    orientation = _floats(
        frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    if position is None or orientation is None:
        raise _reject("no_image_plane", f"{name} lacks ImagePositionPatient/OrientationPatient")
    thickness = frame_attr(ds, index, "PixelMeasuresSequence", "SliceThickness")
    slope = frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    return FrameHeader(
        path=path,
        sop_instance_uid=sop_instance_uid(ds),
        frame_index=index,
        position=(position[0], position[1], position[2]),
        orientation=(
            orientation[0],
            orientation[1],
            orientation[2],
            orientation[3],
            orientation[4],
            orientation[5],
        ),
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=None if thickness is None else float(thickness),
        slope=1.0 if slope is None else float(slope),
        intercept=0.0 if intercept is None else float(intercept),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
    )


# --------------------------------------------------------------------------- geometry


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


def _check_consistent(frames: Sequence[FrameHeader]) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise _reject("inconsistent_geometry", "rows/columns differ between slices")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=1e-3):
            raise _reject("inconsistent_geometry", "PixelSpacing differs between slices")
        if not np.allclose(frame.orientation, first.orientation, atol=1e-3):
            raise _reject("inconsistent_geometry", "ImageOrientationPatient differs between slices")
    if first.rows <= 0 or first.columns <= 0:
        raise _reject("inconsistent_geometry", "Rows/Columns missing")
    norm = np.linalg.norm(np.asarray(first.orientation).reshape(2, 3), axis=1)
    if (
        not np.allclose(norm, 1.0, atol=1e-2)
        or float(np.linalg.norm(slice_normal(first.orientation))) < 0.99
    ):
        raise _reject("inconsistent_geometry", "ImageOrientationPatient is not two unit vectors")


def _stack_normal(orientation: Sequence[float]) -> Vec:
    """Slice normal signed so that it points towards patient +z (superior)."""
    normal = slice_normal(orientation)
    return -normal if normal[2] < 0 else normal


def _sort_frames(frames: Sequence[FrameHeader], normal: Vec) -> list[FrameHeader]:
    return sorted(frames, key=lambda f: float(np.dot(f.position, normal)))


# --------------------------------------------------------------------------- decoding


def read_hu(
    path: Path,
    frame_index: int | None,
    slope: float,
    intercept: float,
    out: FloatArray | None = None,
) -> FloatArray:
    """Decode one frame and apply the modality rescale to HU (PS3.3 C.8.2.1.1.3 / C.7.6.16.2.9).

    Parameters
    ----------
    path : Path
        The instance file; decoding goes through pydicom's pixel handlers (pylibjpeg for JPEG,
        JPEG-LS, JPEG 2000, RLE), reading only the requested frame.
    frame_index : int or None
        0-based frame of a multi-frame instance, None for single-frame.
    slope, intercept : float
        RescaleSlope and RescaleIntercept of this frame.
    out : numpy.ndarray, optional
        float32 ``[rows, columns]`` to write into (no temporary float array is made).

    Returns
    -------
    numpy.ndarray
        float32 HU.
    """
    try:
        stored = pixel_array(_decoder_source(path), index=frame_index)
    except DECODE_ERRORS as exc:
        raise _reject("undecodable_pixel_data", f"{path.name}: {exc}") from exc
    return _rescale(stored, slope, intercept, out, path.name)


DECODE_ERRORS = (
    AttributeError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    KeyError,
    InvalidDicomError,
    OSError,
)


def _decoder_source(path: Path) -> str | Dataset:
    """What to hand pydicom's decoders: the path (frames read on demand), or a dataset.

    pydicom decodes frames straight from the file, except from a Deflated Explicit VR Little
    Endian file (PS3.5 A.5), which needs a full ``dcmread`` first.
    """
    syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    return dcmread(path) if syntax == DeflatedExplicitVRLittleEndian else str(path)


def _rescale(
    stored: npt.NDArray[Any],
    slope: float,
    intercept: float,
    out: FloatArray | None,
    name: str,
) -> FloatArray:
    """``stored * slope + intercept`` as float32, written into ``out`` (PS3.3 C.11.1.1.2)."""
    if stored.ndim != 2:
        raise _reject("unsupported_pixel_data", f"{name}: not a single-sample image")
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    elif out.shape != stored.shape:
        raise _reject("inconsistent_geometry", f"{name}: pixel matrix is not Rows x Columns")
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)
    return out


# --------------------------------------------------------------------------- build


def read_headers(paths: Sequence[Path]) -> tuple[list[FrameHeader], Dataset, bool]:
    """Read every instance's header (pixels deferred) into per-frame records.

    Returns
    -------
    tuple
        The frame records, the first readable dataset (for study-level UIDs), and whether any
        instance declares LossyImageCompression ``01`` (PS3.3 C.7.6.1.1.5).
    """
    frames: list[FrameHeader] = []
    first: Dataset | None = None
    lossy = False
    identities: set[tuple[str, str]] = set()
    for path in paths:
        try:
            ds = dcmread(path, defer_size="2 KB")
        except (InvalidDicomError, OSError) as exc:
            raise _reject("unreadable_instance", f"{Path(path).name}: {exc}") from exc
        first = ds if first is None else first
        frames.extend(frame_headers(ds, Path(path)))
        lossy = lossy or str(ds.get("LossyImageCompression", "")) == "01"
        identities.add(
            (str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", "")))
        )
    if first is None:
        raise _reject("too_few_slices", "the series has no instances")
    if len(identities) > 1:
        raise _reject(
            "mixed_series", "the instances belong to several series or frames of reference"
        )
    return frames, first, lossy


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
        raise _reject(
            "no_frame_of_reference",
            "no FrameOfReferenceUID: positions are not anchored to the patient (PS3.3 C.7.4.1)",
        )
    _check_consistent(frames)
    normal = _stack_normal(frames[0].orientation)
    corrections: list[str] = ["lossy_compressed_source"] if lossy else []
    frames = _drop_duplicates(_sort_frames(frames, normal), normal, corrections)
    if len(frames) < max(1, min_slices):
        raise _reject(
            "too_few_slices",
            f"{len(frames)} distinct slice positions, at least {min_slices} needed",
        )
    heights = np.array([np.dot(f.position, normal) for f in frames])
    plan = _plan_spacing(heights, max_gap_factor, uneven_tolerance, resample_gaps)
    drift = _fit_drift(frames, normal, heights)
    _check_tilt(drift, frames[0], _header_tilt(first), max_tilt_deg, corrections)
    stack, sources = _apply_spacing_plan(_load_stack(frames), heights, plan, frames, corrections)
    volume = _to_canonical(stack, frames[0], normal, plan.spacing, drift, corrections)
    return _finish(volume, sources, frames, first, for_uid, corrections)


def _header_tilt(ds: Dataset) -> float:
    """GantryDetectorTilt (0018,1120) in degrees, 0 when absent (PS3.3 C.8.2.1)."""
    try:
        return float(ds.get("GantryDetectorTilt", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def _check_tilt(
    drift: _Drift,
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
        raise _reject(
            "gantry_tilt", f"gantry tilt of {tilt:.1f} degrees exceeds {max_tilt_deg:.0f} degrees"
        )
    if oblique > max_tilt_deg:
        raise _reject("not_axial", f"image plane is {oblique:.1f} degrees from axial")
    if abs(header_tilt) > 0.5 and max(tilt, oblique) < 0.5:
        corrections.append(f"gantry_tilt_attribute_only:{header_tilt:.2f}deg")


def _finish(
    volume: tuple[FloatArray, tuple[float, float, float], tuple[float, float, float], bool],
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
            raise _reject(
                "duplicate_positions",
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


@dataclass(frozen=True)
class _SpacingPlan:
    spacing: float
    resample: bool
    reason: str


def _plan_spacing(
    heights: npt.NDArray[np.float64],
    max_gap_factor: float,
    uneven_tolerance: float,
    resample_gaps: bool,
) -> _SpacingPlan:
    """Decide between uniform, resample and reject from the positions along the normal."""
    if len(heights) < 2:
        return _SpacingPlan(1.0, False, "")
    steps = np.diff(heights)
    median = float(np.median(steps))
    deviation = np.abs(steps - median)
    if float(deviation.max()) <= SPACING_NOISE_MM + 0.01 * median:
        return _SpacingPlan(median, False, "")
    worst = int(np.argmax(steps))
    if steps[worst] > max_gap_factor * median:
        if not resample_gaps:
            raise _reject(
                "missing_slices",
                f"a {steps[worst]:.2f} mm gap between slices at "
                f"{heights[worst]:.2f} and {heights[worst + 1]:.2f} mm (median "
                f"spacing {median:.2f} mm): slices are missing",
            )
        return _SpacingPlan(median, True, "resampled_missing_slices")
    if float(deviation.max()) > uneven_tolerance * median:
        raise _reject(
            "uneven_spacing",
            f"slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm "
            f"(median {median:.2f} mm)",
        )
    return _SpacingPlan(median, True, "resampled_uneven_spacing")


def _load_stack(frames: Sequence[FrameHeader]) -> FloatArray:
    """Decode every frame into one preallocated float32 array, in the given (z) order.

    Single-frame instances are decoded one file at a time; the frames of a multi-frame instance
    are decoded in one sequential pass over the file (``iter_pixels``), not by seeking each.
    """
    head = frames[0]
    stack = np.empty((len(frames), head.rows, head.columns), dtype=np.float32)
    members: dict[Path, list[tuple[int, FrameHeader]]] = {}
    for k, frame in enumerate(frames):
        members.setdefault(frame.path, []).append((k, frame))
    for path, slots in members.items():
        if slots[0][1].frame_index is None:
            for k, frame in slots:
                read_hu(path, None, frame.slope, frame.intercept, out=stack[k])
        else:
            _load_multiframe(path, slots, stack)
    return stack


def _load_multiframe(path: Path, slots: list[tuple[int, FrameHeader]], stack: FloatArray) -> None:
    """Decode the wanted frames of one multi-frame instance into their slots (PS3.3 C.7.6.16)."""
    by_index = {frame.frame_index: (k, frame) for k, frame in slots}
    wanted = sorted(i for i in by_index if i is not None)
    try:
        decoded = iter_pixels(_decoder_source(path), indices=wanted)
        for index, stored in zip(wanted, decoded, strict=True):
            k, frame = by_index[index]
            _rescale(stored, frame.slope, frame.intercept, stack[k], path.name)
    except DECODE_ERRORS as exc:
        raise _reject("undecodable_pixel_data", f"{path.name}: {exc}") from exc


def _apply_spacing_plan(
    stack: FloatArray,
    heights: npt.NDArray[np.float64],
    plan: _SpacingPlan,
    frames: Sequence[FrameHeader],
    corrections: list[str],
) -> tuple[FloatArray, list[SourceFrame | None]]:
    """Linear interpolation along the stack onto the median spacing (when planned)."""
    sources: list[SourceFrame | None] = [f.source for f in frames]
    if not plan.resample:
        return stack, sources
    count = math.floor((heights[-1] - heights[0]) / plan.spacing + 0.5) + 1
    targets = heights[0] + plan.spacing * np.arange(count)
    out = np.empty((count, *stack.shape[1:]), dtype=np.float32)
    new_sources: list[SourceFrame | None] = []
    for k, target in enumerate(targets):
        upper = int(np.clip(np.searchsorted(heights, target), 1, len(heights) - 1))
        lower = upper - 1
        weight = float((target - heights[lower]) / (heights[upper] - heights[lower]))
        weight = min(1.0, max(0.0, weight))
        np.multiply(stack[lower], np.float32(1.0 - weight), out=out[k])
        out[k] += np.float32(weight) * stack[upper]
        new_sources.append(_exact_source(frames, heights, target, plan.spacing))
    corrections.append(f"{plan.reason}:{plan.spacing:.4g}")
    return out, new_sources


def _exact_source(
    frames: Sequence[FrameHeader], heights: npt.NDArray[np.float64], target: float, spacing: float
) -> SourceFrame | None:
    nearest = int(np.argmin(np.abs(heights - target)))
    if abs(heights[nearest] - target) <= 1e-3 * spacing:
        return frames[nearest].source
    return None


# --------------------------------------------------------------------------- canonical grid

Canonical = tuple[FloatArray, tuple[float, float, float], tuple[float, float, float], bool]


@dataclass(frozen=True)
class _Drift:
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


def _fit_drift(
    frames: Sequence[FrameHeader], normal: Vec, heights: npt.NDArray[np.float64]
) -> _Drift:
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
        return _Drift(heights, along_row, along_col, (0.0, 0.0))
    per_mm = (
        float(np.dot(rel, along_row) / np.dot(rel, rel)),
        float(np.dot(rel, along_col) / np.dot(rel, rel)),
    )
    residual = max(
        float(np.abs(along_row - per_mm[0] * rel).max() / head.pixel_spacing[1]),
        float(np.abs(along_col - per_mm[1] * rel).max() / head.pixel_spacing[0]),
    )
    if residual > DRIFT_RESIDUAL_PX:
        raise _reject(
            "inconsistent_geometry",
            f"slice positions wander in-plane by up to {residual:.1f} pixels off a straight stack",
        )
    return _Drift(heights, along_row, along_col, per_mm)


def _has_drift(drift: _Drift, head: FrameHeader) -> bool:
    span = float(drift.heights[-1] - drift.heights[0])
    pixels = (
        abs(drift.per_mm[0]) * span / head.pixel_spacing[1]
        + abs(drift.per_mm[1]) * span / head.pixel_spacing[0]
    )
    return pixels > DRIFT_NOISE_PX


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


def _to_canonical(
    stack: FloatArray,
    head: FrameHeader,
    normal: Vec,
    spacing: float,
    drift: _Drift,
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


def _shift_slices(stack: FloatArray, head: FrameHeader, spacing: float, drift: _Drift) -> None:
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
    drift: _Drift,
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
