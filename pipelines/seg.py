"""DICOM Segmentation (PS3.3 A.51, C.8.20) of the detected nodules, with highdicom.

One BINARY segment per nodule (C.8.20.2 Segment Sequence): category "Morphologically abnormal
structure" (SCT 49755003), type "Nodule" (SCT 27925004), anatomic region "Lung" (SCT 39607008),
algorithm type AUTOMATIC with the model's name and version (Algorithm Identification, C.8.20.2,
family "Artificial Intelligence" from CID 7162), and the nodule's tracking identifier and UID
(the same UID as the nodule's SR measurement groups), and a Recommended Display CIELab Value
(C.8.20.2; :func:`segment_color`, distinct for every segment) so that viewers draw every nodule
in a colour we chose instead of substituting a default (OHIF 3 warns
"RecommendedDisplayCIELabValue not found for one or more segments. The default color was used
instead." without it).

Frame layout (the decision, for viewers)
----------------------------------------
Every frame lies exactly on a stored source frame and carries pixels of its segment: highdicom
copies each frame's ImagePositionPatient from the source image it is derived from and references
that image (and frame number, for multi-frame sources) in the frame's Derivation Image Sequence,
and empty frames are omitted (``omit_empty_frames=True``). A segment's frames are the slices its
mask touches, without gaps (a nodule is one connected region), and nothing else: SEGs of several
nodules far apart no longer carry the empty slices between them (they were about 80 % of the
file). OHIF 3.13 places each frame by its reference and position, so a second segment whose frames
follow a gap of empty slices is drawn on its own slices (checked in the OHIF test, against the
"overlay shifts when empty frames are omitted" report of MONAI Deploy SDK issue 397, which came
from frames without per-frame positions). The pixel data stays uncompressed (Explicit VR Little
Endian, one bit per pixel): a compressed SEG has not been checked in OHIF yet.

* Single-frame sources (CT Image): the source images are the slices any segment touches.
* Multi-frame sources (Enhanced CT): highdicom derives from one multi-frame instance; the SEG
  references the source frames by number. Nodules on frames of other instances are not encoded
  (see ``encode_segmentation``'s Raises).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.results import MANUFACTURER
from pipelines.masks import PlaneMask
from pipelines.uids import ResultUIDs

SEG_SERIES_NUMBER = 9701
DEVICE_SERIAL_NUMBER = "noduleai"
#: Display colours (sRGB) of segments 1 to 5: saturated, distinct, visible on grey CT.
SEGMENT_COLORS_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 80, 40),
    (60, 180, 255),
    (255, 215, 0),
    (170, 90, 255),
    (255, 105, 180),
)
#: Hue step for segments beyond those: the golden angle, so no two segments share a colour.
GOLDEN_ANGLE = 137.50776405


def segment_color(number: int) -> tuple[int, int, int]:
    """The sRGB display colour of segment ``number`` (1-based): distinct for every segment."""
    if number <= len(SEGMENT_COLORS_RGB):
        return SEGMENT_COLORS_RGB[number - 1]
    hue = ((number - len(SEGMENT_COLORS_RGB)) * GOLDEN_ANGLE % 360.0) / 360.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


@dataclass(frozen=True)
class SegmentInput:
    """What one segment needs: its masks on stored frames, its tracking identity and what it is
    (segmented property type: SCT Nodule, SCT Mass or DCM Opacity)."""

    masks: Sequence[PlaneMask]
    tracking_id: str
    tracking_uid: str
    label: str
    property_type: Code = codes.SCT.Nodule


def algorithm_identification(
    model_name: str, model_version: str
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (PS3.3 C.8.20.2, family CID 7162 Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model_version,
    )


def segment_description(
    number: int, segment: SegmentInput, model_name: str, model_version: str
) -> hd.seg.SegmentDescription:
    """One nodule's Segment Sequence item (PS3.3 C.8.20.2)."""
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=segment.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model_name, model_version),
        tracking_uid=segment.tracking_uid,
        tracking_id=segment.tracking_id,
        anatomic_regions=[codes.SCT.Lung],
        display_color=hd.color.CIELabColor.from_rgb(*segment_color(number)),
    )


def _frame_key(mask: PlaneMask) -> tuple[str, int | None]:
    return mask.plane.source.sop_instance_uid, mask.plane.source.frame_number


def encode_segmentation(
    source_datasets: Sequence[Dataset],
    slice_order: Sequence[tuple[str, int | None]],
    segments: Sequence[SegmentInput],
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
) -> Dataset:
    """Build the SEG instance.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        The source series' instances (headers suffice), any order.
    slice_order : sequence of (str, int or None)
        ``(SOPInstanceUID, frame number)`` of each Volume slice, in z order (from
        :func:`pipelines.masks.source_planes`); the SEG's source images follow it.
    segments : sequence of SegmentInput
        One per nodule, at least one, each with a non-empty mask.
    uids : ResultUIDs
        Gives SeriesInstanceUID and SOPInstanceUID.
    model_name, model_version : str
        For Algorithm Identification and SoftwareVersions.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.seg.Segmentation``.

    Raises
    ------
    ValueError
        No segments, a segment with no pixels, or nodules on frames of several multi-frame
        instances.
    """
    if not segments:
        raise ValueError("a SEG needs at least one segment")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    touched = {_frame_key(m) for segment in segments for m in segment.masks if m.area_px > 0}
    if not touched:
        raise ValueError("no segment has any pixel on a source frame")
    multiframe = any(frame is not None for _, frame in touched)
    if multiframe:
        images, frames = _multiframe_layout(by_uid, touched)
    else:
        frames = [key for key in slice_order if key in touched]
        images = [by_uid[uid] for uid, _ in frames]
    head = images[0]
    pixels = np.zeros((len(frames), int(head.Rows), int(head.Columns), len(segments)), np.uint8)
    index = {key: i for i, key in enumerate(frames)}
    for s, segment in enumerate(segments):
        for m in segment.masks:
            i = index.get(_frame_key(m))
            if i is not None:
                pixels[i, :, :, s] |= m.mask
    descriptions = [
        segment_description(s + 1, segment, model_name, model_version)
        for s, segment in enumerate(segments)
    ]
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.seg_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="NODULES",
        content_description="Lung nodules (automatic detection)",
        series_description="NoduleAI nodule segmentation",
        omit_empty_frames=True,
    )


def _multiframe_layout(
    by_uid: dict[str, Dataset], touched: set[tuple[str, int | None]]
) -> tuple[list[Dataset], list[tuple[str, int | None]]]:
    instances = {uid for uid, _ in touched}
    if len(instances) > 1:
        raise ValueError("nodules span several multi-frame instances; one SEG cannot derive them")
    uid = instances.pop()
    ds = by_uid[uid]
    count = int(ds.get("NumberOfFrames", 1) or 1)
    return [ds], [(uid, n) for n in range(1, count + 1)]
