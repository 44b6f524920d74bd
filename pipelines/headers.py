"""DICOM header access for series selection, volume building and masks (no pixel decoding).

SOP Class / Instance UIDs with their file-meta fallbacks, frame counts, attributes of one frame of
a single- or multi-frame instance (PS3.3 C.7.6.16 Multi-frame Functional Groups: per-frame group,
then shared group, then the top level), and per-frame geometry and rescale records
(:class:`FrameHeader`, PS3.3 C.7.6.2 Image Plane, C.8.2.1 CT Image) read with pixel data deferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.errors import RejectionCode, StudyRejectedError

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


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
        raise StudyRejectedError(RejectionCode.NO_PIXEL_DATA, f"{name} has no Pixel Data")
    multi = is_multiframe(ds)
    indices: list[int | None] = list(range(number_of_frames(ds))) if multi else [None]
    return [_frame_header(ds, path, index) for index in indices]


def _frame_header(ds: Dataset, path: Path, index: int | None) -> FrameHeader:
    name = path.name if index is None else f"{path.name} frame {index + 1}"
    spacing = _floats(frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if spacing is None or min(spacing) <= 0:
        raise StudyRejectedError(
            RejectionCode.NO_PIXEL_SPACING, f"{name} has no usable PixelSpacing"
        )
    position = _floats(frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
    orientation = _floats(
        frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    if position is None or orientation is None:
        raise StudyRejectedError(
            RejectionCode.NO_IMAGE_PLANE, f"{name} lacks ImagePositionPatient/OrientationPatient"
        )
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
            raise StudyRejectedError(
                RejectionCode.UNREADABLE_INSTANCE, f"{Path(path).name}: {exc}"
            ) from exc
        first = ds if first is None else first
        frames.extend(frame_headers(ds, Path(path)))
        lossy = lossy or str(ds.get("LossyImageCompression", "")) == "01"
        identities.add(
            (str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", "")))
        )
    if first is None:
        raise StudyRejectedError(RejectionCode.TOO_FEW_SLICES, "the series has no instances")
    if len(identities) > 1:
        raise StudyRejectedError(
            RejectionCode.MIXED_SERIES,
            "the instances belong to several series or frames of reference",
        )
    return frames, first, lossy


def header_tilt(ds: Dataset) -> float:
    """GantryDetectorTilt (0018,1120) in degrees, 0 when absent (PS3.3 C.8.2.1)."""
    try:
        return float(ds.get("GantryDetectorTilt", 0) or 0)
    except (TypeError, ValueError):
        return 0.0
