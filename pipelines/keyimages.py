"""Key images: one Secondary Capture per finding, for viewers that draw neither SEG nor SR.

Each image (PS3.3 A.8.1 Secondary Capture Image, RGB, 8 bits, via highdicom's ``SCImage``) is the
stored axial slice on which the finding's outline is largest, as the SR draws it:

- the slice's HU sampled from the series volume at the stored frame's own pixel positions (so the
  image has the stored matrix and PixelSpacing, and the outline's image coordinates hold), shown
  in a lung window (width 1500 HU, level -600 HU, :data:`LUNG_WINDOW`);
- the outline in the finding's segment colour (:func:`pipelines.seg.segment_color`, the colour
  the SEG recommends), a label beside it with the finding's number;
- burned-in text: finding number, size (long x short axis), type, Lung-RADS category, Brock risk
  where known, and :data:`DISCLAIMER` ("AI result - not for diagnosis"). Nothing of the patient
  is burned in; the DICOM header carries the patient and study of the source (as every result
  object does), and BurnedInAnnotation is YES.

The images form one series per source series and model (:meth:`pipelines.uids.ResultUIDs.
key_image_uids`), in the source study, delivered with the other results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset

from dicom_node.results import MANUFACTURER
from pipelines.masks import Outline, SourcePlane
from pipelines.seg import segment_color
from pipelines.sr import Assessment
from pipelines.uids import ResultUIDs
from pipelines.volume import Volume

KEY_IMAGE_SERIES_NUMBER = 9704
#: Lung window (centre, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)
#: Burned in, and in ImageComments (ASCII: the built-in font and Latin-1 headers both hold it).
DISCLAIMER = "AI result - not for diagnosis"
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 210, 0)
FONT_SIZE = 14


@dataclass(frozen=True)
class KeyFinding:
    """What one key image shows of its finding."""

    number: int
    outline: Outline
    type: str
    assessment: Assessment


def plane_hu(volume: Volume, plane: SourcePlane) -> npt.NDArray[np.float32]:
    """HU at the stored frame's pixel centres, sampled (nearest) from the canonical volume.

    Pixels outside the volume are -1024 HU (air). For an axial series the samples are the stored
    pixels themselves (after the rescale).
    """
    rows, columns = np.mgrid[0 : plane.rows, 0 : plane.columns]
    dr, dc = plane.pixel_spacing
    xyz = (
        plane.position[None, None, :]
        + columns[..., None] * dc * plane.row_cosine[None, None, :]
        + rows[..., None] * dr * plane.column_cosine[None, None, :]
    )
    dz, dy, dx = volume.spacing_mm
    ox, oy, oz = volume.origin_mm
    index = np.rint((xyz - (ox, oy, oz)) / (dx, dy, dz)).astype(np.int64)  # (i, j, k)
    k, j, i = index[..., 2], index[..., 1], index[..., 0]
    nz, ny, nx = volume.hu.shape
    inside = (i >= 0) & (i < nx) & (j >= 0) & (j < ny) & (k >= 0) & (k < nz)
    out = np.full((plane.rows, plane.columns), -1024.0, dtype=np.float32)
    out[inside] = volume.hu[k[inside], j[inside], i[inside]]
    return out


def windowed(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """8-bit grey of ``hu`` in the lung window (PS3.3 C.11.2.1.2.1, linear)."""
    centre, width = LUNG_WINDOW
    scaled = (hu - (centre - 0.5)) / (width - 1.0) + 0.5
    return np.asarray(np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5, dtype=np.uint8)


def caption(finding: KeyFinding) -> list[str]:
    """The burned-in lines (no patient attribute)."""
    outline, assessed = finding.outline, finding.assessment
    size = f"{outline.long_axis_mm:.1f} x {outline.short_axis_mm:.1f} mm"
    risk = assessed.risk.probability
    kind = assessed.lesion_class.label.lower()
    lines = [f"Finding {finding.number}: {finding.type} {kind}, {size}"]
    if assessed.lung_rads:
        lines.append(
            f"Lung-RADS v2022 {assessed.lung_rads} (baseline)"
            + (f", Brock risk {100 * risk:.1f} %" if risk is not None else "")
        )
    if assessed.needs_review:
        lines.append("Needs review")
    return lines


def render(hu: npt.NDArray[np.float32], finding: KeyFinding) -> npt.NDArray[np.uint8]:
    """The key image: lung window, outline, label, caption and disclaimer; RGB ``[r, c, 3]``."""
    grey = windowed(hu)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    colour = segment_color(finding.number)
    points = [(float(c), float(r)) for c, r in finding.outline.points]
    draw.line(points, fill=colour, width=2)
    left = max(0.0, min(c for c, _ in points))
    top = min(r for _, r in points)
    draw.text((left, max(0.0, top - FONT_SIZE - 4)), str(finding.number), fill=colour, font=font)
    y = 6
    for line in caption(finding):
        draw.text((6, y), line, fill=TEXT_COLOUR, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        y += FONT_SIZE + 4
    draw.text(
        (6, image.height - FONT_SIZE - 8),
        DISCLAIMER,
        fill=WARNING_COLOUR,
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return np.asarray(image, dtype=np.uint8)


def encode_key_images(
    volume: Volume,
    sources: dict[str, Dataset],
    findings: Sequence[KeyFinding],
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
) -> list[Dataset]:
    """One Secondary Capture per finding, in ``findings`` order.

    Parameters
    ----------
    volume : Volume
        The series volume (HU of the key slices).
    sources : dict of str to pydicom.Dataset
        Source headers by SOPInstanceUID (patient, study, and the image's pixel spacing).
    findings : sequence of KeyFinding
        The reported findings with their outlines and assessments.
    uids : ResultUIDs
        Series and instance UIDs (:meth:`ResultUIDs.key_image_uids`).
    model_name, model_version : str
        Equipment attributes.

    Returns
    -------
    list of pydicom.Dataset
        ``highdicom.sc.SCImage`` instances, InstanceNumber = finding number.
    """
    images: list[Dataset] = []
    for finding in findings:
        plane = finding.outline.plane
        source = sources[plane.source.sop_instance_uid]
        series_uid, sop_uid = uids.key_image_uids(finding.number - 1)
        pixels = render(plane_hu(volume, plane), finding)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=KEY_IMAGE_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=finding.number,
            manufacturer=MANUFACTURER,
            pixel_spacing=plane.pixel_spacing,  # type: ignore[arg-type]  # highdicom: int
            patient_orientation=_patient_orientation(plane),
        )
        image.SeriesDescription = "NoduleAI key images"
        image.ImageComments = DISCLAIMER
        image.BurnedInAnnotation = "YES"
        # The chest is not a paired body part: General Series Laterality (Type 2C) stays absent.
        image.BodyPartExamined = "CHEST"
        image.ManufacturerModelName = model_name
        image.SoftwareVersions = model_version
        reference = Dataset()  # General Image Source Image Sequence: the slice shown
        reference.ReferencedSOPClassUID = plane.sop_class_uid
        reference.ReferencedSOPInstanceUID = plane.source.sop_instance_uid
        if plane.source.frame_number is not None:
            reference.ReferencedFrameNumber = plane.source.frame_number
        image.SourceImageSequence = [reference]
        image.DerivationDescription = (
            f"Slice of largest extent of finding {finding.number}, lung window, outline and "
            "findings burned in"
        )
        images.append(image)
    return images


def _patient_orientation(plane: SourcePlane) -> tuple[str, str]:
    """PatientOrientation (PS3.3 C.7.6.1.1.1): the patient directions of the rows and columns."""
    return _direction(plane.row_cosine), _direction(plane.column_cosine)


def _direction(cosine: npt.NDArray[np.float64]) -> str:
    """The main patient direction (L/R, P/A, H/F) a unit vector points to."""
    axis = int(np.argmax(np.abs(cosine)))
    towards, away = (("L", "R"), ("P", "A"), ("H", "F"))[axis]  # LPS: +x left, +y posterior
    return towards if cosine[axis] > 0 else away
