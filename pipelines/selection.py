"""Pick the one series of a study that the nodule detector should analyse.

Only headers are read (``dcmread(stop_before_pixels=True)``); files that are not DICOM are skipped
with a debug log. Instances are grouped by SeriesInstanceUID; instances whose SeriesInstanceUID
is empty (seen in the anonymised TotalSegmentator JPEG 2000 test files) are grouped by
FrameOfReferenceUID, or by directory when that is empty too, under the key
``no-series-uid:<that value>``, so that the refusal can name them.

A series is **eligible** when (PS3.3 C.7.3.1 General Series, C.7.6.2 Image Plane, C.8.2.1 CT
Image, C.7.6.16 Multi-frame Functional Groups):

* it is CT: Modality ``CT``, or (Modality missing) a CT Image / Enhanced CT Image Storage SOP
  class;
* every instance has a StudyInstanceUID and a SeriesInstanceUID (PS3.3 C.7.2.1, C.7.3.1, Type
  1): result objects reference the images by them, and the node refuses such instances at
  C-STORE (status A900) for the same reason;
* ImageType / FrameType value 1 is ``ORIGINAL`` and no value is ``LOCALIZER`` (DERIVED and
  SECONDARY reconstructions such as MIPs, MPRs and scouts are refused);
* every instance has pixel spacing, position and an orientation within ``max_tilt_deg``
  (default 10 degrees) of axial, and a FrameOfReferenceUID (without one, positions are not
  anchored to the patient: the placeholder geometry of ``malformed/`` is refused here);
* it has at least ``min_slices`` distinct slice positions (default 20);
* its effective slice thickness, ``max(SliceThickness, spacing between positions)``, is at most
  ``max_thickness_mm`` (default 5 mm).

Among eligible series the ranking is, in order:

1. regular spacing (even spacing, no duplicate positions) before irregular: an irregular series
   stays eligible, flagged ``irregular_spacing``, so that volume building can resample it or
   reject it with its precise reason (``missing_slices``, ``uneven_spacing``,
   ``duplicate_positions``) when nothing better exists;
2. effective thickness class: thin (<= 1.5 mm), then standard (<= 3 mm), then thick (<= 5 mm,
   accepted only when nothing thinner qualifies: a hospital would rather have 5 mm analysed,
   flagged ``thick_slices`` in :attr:`SelectedSeries.warnings`, than nothing);
3. a lung (sharp) reconstruction kernel before a soft one (:func:`is_lung_kernel`);
4. thinner effective thickness, then more slices (coverage), then the key (deterministic).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.errors import RejectionCode, StudyRejectedError
from pipelines.geometry import SAME_POSITION_MM, SPACING_NOISE_MM, axial_angle_deg, slice_normal
from pipelines.headers import (
    CT_IMAGE,
    ENHANCED_CT,
    frame_attr,
    is_multiframe,
    number_of_frames,
    sop_class_uid,
)

log = logging.getLogger(__name__)

CT_SOP_CLASSES = frozenset({CT_IMAGE, ENHANCED_CT})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
THIN_MM = 1.5
PREFERRED_MM = 3.0

_SIEMENS = re.compile(r"^(?:B|BR|BL|BF|I|IR|HR|Q)\s?(\d{2})")
_TOSHIBA = re.compile(r"^FC\s?(\d{2})")
_LUNG_WORDS = ("LUNG", "BONE", "SHARP", "EDGE", "DETAIL", "HIGH", "CHEST")
_PHILIPS_LUNG = frozenset({"L", "LA", "LB", "LC", "YA", "YB", "YC", "YD", "D", "E"})


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for analysis.

    Attributes
    ----------
    series_instance_uid : str
        Its SeriesInstanceUID.
    paths : list of Path
        Its instance files, sorted by path.
    reasons_by_series : dict of str to str
        For every series of the study (by SeriesInstanceUID, or the ``no-series-uid:`` key),
        why it was chosen, passed over or refused.
    warnings : tuple of str
        Machine-readable caveats of the choice, e.g. ``thick_slices``.
    """

    series_instance_uid: str
    paths: list[Path]
    reasons_by_series: dict[str, str]
    warnings: tuple[str, ...] = field(default_factory=tuple)


class NoEligibleSeriesError(StudyRejectedError):
    """``no_eligible_series``, with the per-series reasons kept machine-readable.

    Attributes
    ----------
    reasons_by_series : dict of str to list of str
        For each series key, its refusal reasons (``not_ct``, ``not_original``, ``localizer``,
        ``not_axial``, ``no_frame_of_reference``, ``no_image_plane``, ``inconsistent_geometry``,
        ``too_few_slices``, ``too_thick``), each followed by ``: detail``.
    """

    def __init__(self, reasons_by_series: dict[str, list[str]]) -> None:
        parts = [
            f"series {key}: {'; '.join(reasons)}" for key, reasons in reasons_by_series.items()
        ]
        detail = "no series qualifies: " + (" | ".join(parts) if parts else "no DICOM images")
        super().__init__(RejectionCode.NO_ELIGIBLE_SERIES, detail + ".")
        self.reasons_by_series = reasons_by_series

    def to_json(self) -> str:
        """The per-series reasons as a JSON object (key -> list of reason strings)."""
        return json.dumps(self.reasons_by_series, sort_keys=True)


_IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID")
"""What result objects reference a series' images by (besides each instance's SOPInstanceUID,
which the file meta also holds)."""


@dataclass
class _Series:
    """Header summary of one series, accumulated instance by instance."""

    key: str
    series_instance_uid: str
    paths: list[Path] = field(default_factory=list)
    modalities: set[str] = field(default_factory=set)
    sop_classes: set[str] = field(default_factory=set)
    image_types: set[tuple[str, ...]] = field(default_factory=set)
    kernels: set[str] = field(default_factory=set)
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    orientations: list[tuple[float, ...]] = field(default_factory=list)
    thicknesses: list[float] = field(default_factory=list)
    missing_plane: int = 0
    missing_for: int = 0
    missing_uids: int = 0


@dataclass(frozen=True)
class _Judgement:
    key: str
    reasons: list[str]
    rank: tuple[int, int, int, float, int, str] = (0, 0, 0, 0.0, 0, "")
    thickness: float = math.inf
    irregular: bool = False


def is_lung_kernel(kernel: str) -> bool:
    """Whether a ConvolutionKernel (0018,1210) names a lung/sharp reconstruction.

    Heuristic: GE ``LUNG``, ``BONE``, ``EDGE``, ``DETAIL``; any name with ``LUNG``, ``SHARP``,
    ``HIGH`` or ``CHEST``; Siemens ``B``/``Br``/``Bl``/``I``/``Hr``/``Q`` kernels numbered 50 or
    more (B60f, B70f, I70f, Br64) and every ``Bl`` kernel (Siemens' lung family); Canon/Toshiba
    ``FC5x`` (lung) and ``FC8x`` (bone-sharp); Philips ``L``, ``LA``-``LC``, ``Y*``, ``D``, ``E``.
    """
    text = " ".join(kernel.upper().split())
    if any(word in text for word in _LUNG_WORDS):
        return True
    if text.startswith("BL"):
        return True
    for pattern in (_SIEMENS, _TOSHIBA):
        match = pattern.match(text)
        if match:
            number = int(match.group(1))
            return number >= 50 if pattern is _SIEMENS else number // 10 in (5, 8)
    return text.split(" ")[0] in _PHILIPS_LUNG if text else False


def select_series(
    paths: Iterable[Path],
    *,
    min_slices: int = 20,
    max_tilt_deg: float = 10.0,
    max_thickness_mm: float = 5.0,
) -> SelectedSeries:
    """Choose the series to analyse among a study's files.

    Parameters
    ----------
    paths : iterable of Path
        Files of the study (non-DICOM files are ignored).
    min_slices : int
        Fewest distinct slice positions of an eligible series.
    max_tilt_deg : float
        Largest angle between the slice normal and patient z for an "axial" series.
    max_thickness_mm : float
        Thickest effective slice accepted at all (3 mm or less is preferred).

    Returns
    -------
    SelectedSeries
        The chosen series, with a reason for every series of the study.

    Raises
    ------
    NoEligibleSeriesError
        A :class:`StudyRejectedError` with code ``no_eligible_series``; its detail is a sentence
        naming every series and why it was refused, its ``reasons_by_series`` attribute (and
        ``to_json()``) the same, machine-readable.
    """
    groups = _group(paths)
    judged = [_judge(s, min_slices, max_tilt_deg, max_thickness_mm) for s in groups.values()]
    eligible = sorted((j for j in judged if not j.reasons), key=lambda j: j.rank)
    if not eligible:
        raise NoEligibleSeriesError({j.key: j.reasons for j in judged})
    best = eligible[0]
    reasons = {j.key: "; ".join(j.reasons) for j in judged if j.reasons}
    for j in eligible:
        reasons[j.key] = _describe(j, groups[j.key], chosen=j is best)
    chosen = groups[best.key]
    warnings = ("thick_slices",) if best.thickness > PREFERRED_MM else ()
    if best.irregular:
        warnings = (*warnings, "irregular_spacing")
    return SelectedSeries(chosen.series_instance_uid, sorted(chosen.paths), reasons, warnings)


def _describe(j: _Judgement, series: _Series, *, chosen: bool) -> str:
    kernel = "/".join(sorted(series.kernels)) or "unknown kernel"
    verdict = "selected" if chosen else "eligible, ranked lower"
    return (
        f"{verdict}: {len(set(series.positions))} slices, {j.thickness:.2f} mm effective "
        f"thickness, kernel {kernel}" + (", irregular spacing" if j.irregular else "")
    )


def _group(paths: Iterable[Path]) -> dict[str, _Series]:
    groups: dict[str, _Series] = {}
    for path in paths:
        ds = _read_header(Path(path))
        if ds is None:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = uid or "no-series-uid:" + (
            str(ds.get("FrameOfReferenceUID", "") or "") or str(Path(path).parent)
        )
        series = groups.setdefault(key, _Series(key, uid))
        _accumulate(series, ds, Path(path))
    return groups


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM instance; None (logged at debug) for anything else or a DICOMDIR."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        log.debug("skipping %s: not DICOM (%s)", path.name, type(exc).__name__)
        return None
    if sop_class_uid(ds) == MEDIA_STORAGE_DIRECTORY:
        log.debug("skipping %s: DICOMDIR", path.name)
        return None
    return ds


def _accumulate(series: _Series, ds: Dataset, path: Path) -> None:
    """Add one instance's header facts (every frame for multi-frame) to its series."""
    series.paths.append(path)
    series.modalities.add(str(ds.get("Modality", "") or ""))
    series.sop_classes.add(sop_class_uid(ds))
    series.kernels.add(_kernel_text(ds))
    if not ds.get("FrameOfReferenceUID"):
        series.missing_for += 1
    if not all(ds.get(k) for k in _IDENTIFYING_UIDS):
        series.missing_uids += 1
    indices: list[int | None] = list(range(number_of_frames(ds))) if is_multiframe(ds) else [None]
    for index in indices:
        _accumulate_frame(series, ds, index)


def _accumulate_frame(series: _Series, ds: Dataset, index: int | None) -> None:
    image_type = frame_attr(ds, index, "CTImageFrameTypeSequence", "FrameType")
    if image_type is None:
        image_type = ds.get("ImageType")
    series.image_types.add(_multi(image_type))
    position = frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient")
    orientation = frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing")
    if position is None or orientation is None or spacing is None:
        series.missing_plane += 1
        return
    try:
        series.positions.append(tuple(float(v) for v in position))  # type: ignore[arg-type]
        series.orientations.append(tuple(float(v) for v in orientation))
    except (TypeError, ValueError):
        series.missing_plane += 1
        return
    thickness = frame_attr(ds, index, "PixelMeasuresSequence", "SliceThickness")
    if thickness is not None:
        series.thicknesses.append(float(thickness))


def _multi(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)  # type: ignore[attr-defined]


def _kernel_text(ds: Dataset) -> str:
    kernel = ds.get("ConvolutionKernel")
    if kernel is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        items = shared[0].get("CTReconstructionSequence") if shared else None
        kernel = items[0].get("ConvolutionKernel") if items else None
    return " ".join(_multi(kernel))


def _judge(
    series: _Series, min_slices: int, max_tilt_deg: float, max_thickness_mm: float
) -> _Judgement:
    reasons = _content_reasons(series)
    geometry, thickness, irregular = _geometry_reasons(series, min_slices, max_tilt_deg)
    reasons += geometry
    if not geometry and thickness > max_thickness_mm:
        reasons.append(
            f"too_thick: {thickness:.2f} mm effective slice thickness (> {max_thickness_mm:g} mm)"
        )
    if reasons:
        return _Judgement(series.key, reasons)
    lung = any(is_lung_kernel(k) for k in series.kernels)
    thickness_class = 0 if thickness <= THIN_MM else 1 if thickness <= PREFERRED_MM else 2
    rank = (
        int(irregular),
        thickness_class,
        int(not lung),
        round(thickness, 2),
        -len(set(series.positions)),
        series.key,
    )
    return _Judgement(series.key, [], rank, thickness, irregular)


def _content_reasons(series: _Series) -> list[str]:
    """Modality, SOP class and ImageType checks (PS3.3 C.7.3.1, C.8.2.1.1.1)."""
    reasons: list[str] = []
    modalities = series.modalities - {""}
    is_ct = modalities == {"CT"} or (not modalities and series.sop_classes <= CT_SOP_CLASSES)
    if not is_ct:
        shown = "/".join(sorted(modalities)) or "none"
        reasons.append(f"not_ct: Modality {shown}")
    if any(not t or t[0] != "ORIGINAL" for t in series.image_types):
        shown = ", ".join(sorted("\\".join(t) or "absent" for t in series.image_types))
        reasons.append(f"not_original: ImageType {shown}")
    if any("LOCALIZER" in t for t in series.image_types):
        reasons.append("localizer: ImageType LOCALIZER")
    if series.missing_uids:
        reasons.append(
            "no_study_or_series_uid: StudyInstanceUID or SeriesInstanceUID missing, result "
            "objects could not reference the images"
        )
    if series.missing_for:
        reasons.append(
            "no_frame_of_reference: FrameOfReferenceUID missing, positions are "
            "not anchored to the patient"
        )
    return reasons


def _geometry_reasons(
    series: _Series, min_slices: int, max_tilt_deg: float
) -> tuple[list[str], float, bool]:
    """Orientation, slice count, spacing (PS3.3 C.7.6.2): reasons, thickness, irregular."""
    if series.missing_plane:
        return ["no_image_plane: position, orientation or pixel spacing missing"], math.inf, False
    if np.ptp(np.array(series.orientations), axis=0).max() > 1e-3:
        return ["inconsistent_geometry: orientation differs between slices"], math.inf, False
    angles = [axial_angle_deg(o) for o in series.orientations]
    if max(angles) > max_tilt_deg:
        return [f"not_axial: slice plane {max(angles):.0f} degrees from axial"], math.inf, False
    normal = slice_normal(series.orientations[0])
    heights = np.unique(np.round(np.array(series.positions) @ normal / SAME_POSITION_MM))
    heights = heights * SAME_POSITION_MM
    if len(heights) < min_slices:
        return [f"too_few_slices: {len(heights)} slice positions (< {min_slices})"], math.inf, False
    steps = np.diff(heights)
    median = float(np.median(steps))
    uneven = float(np.abs(steps - median).max()) > SPACING_NOISE_MM + 0.01 * median
    irregular = uneven or len(heights) < len(series.positions)
    thickness = max(median, max(series.thicknesses, default=0.0))
    return [], thickness, irregular
