"""Grayscale Softcopy Presentation State (PS3.3 A.33.1, C.11.10 Graphic Annotation) of nodules.

For PACS viewers that draw neither SEG nor SR: per nodule, on the stored image of its largest
extent, the closed outline (a POLYLINE graphic object in PIXEL units, PS3.3 C.10.5) and a short
text label such as ``Nodule 1 12.5 mm solid 0.93`` (tracking identifier with the finding's
class, long axis, attenuation type, detection probability; ``?`` appended when review is
recommended) placed just above the outline.
Graphics go on one layer ("NODULES", yellow). The presentation state references every image of
the series, so its lung window (Softcopy VOI LUT, C.11.8: width 1500, centre -600) applies to the
whole series; each annotation references only its own image (and frame, for multi-frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicom_node.results import MANUFACTURER
from pipelines.findings import Nodule
from pipelines.masks import Outline
from pipelines.uids import ResultUIDs

GSPS_SERIES_NUMBER = 9703
DEVICE_SERIAL_NUMBER = "noduleai"
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
LAYER = "NODULES"
#: Yellow in CIELab (PS3.3 C.10.7.1.1), scaled as highdicom expects (L 0-100, a/b -128-127).
YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)
LABEL_HEIGHT_PX = 14.0
LABEL_WIDTH_PX = 150.0


@dataclass(frozen=True)
class GspsNodule:
    """One nodule's outline and identity for the presentation state."""

    nodule: Nodule
    outline: Outline
    tracking_id: str
    tracking_uid: str
    needs_review: bool


def label(item: GspsNodule) -> str:
    """Short text: ``<tracking id> <long axis> mm <type> <probability>`` ("Mass 1 34.3 mm solid
    1.00", 64 characters at most, `` ?`` when it needs review); the long axis is the one measured
    on the drawn outline, as in the SR."""
    nodule = item.nodule
    flag = " ?" if item.needs_review else ""
    size = item.outline.long_axis_mm
    return f"{item.tracking_id} {size:.1f} mm {nodule.type} {nodule.probability:.2f}{flag}"[:64]


def _label_box(outline: Outline) -> tuple[float, float, float, float]:
    """Bounding box (left, top, right, bottom) above the outline, kept inside the image."""
    plane = outline.plane
    left = float(np.clip(outline.points[:, 0].min(), 0.0, max(0.0, plane.columns - LABEL_WIDTH_PX)))
    top = float(outline.points[:, 1].min()) - LABEL_HEIGHT_PX - 2.0
    if top < 0.0:
        top = min(float(outline.points[:, 1].max()) + 2.0, plane.rows - LABEL_HEIGHT_PX)
    right = min(left + LABEL_WIDTH_PX, float(plane.columns))
    return (left, top, right, top + LABEL_HEIGHT_PX)


def annotation(
    item: GspsNodule, image: Dataset, layer: hd.pr.GraphicLayer
) -> hd.pr.GraphicAnnotation:
    """Graphic Annotation Sequence item (PS3.3 C.10.5) for one nodule."""
    frame = item.outline.plane.source.frame_number
    return hd.pr.GraphicAnnotation(
        referenced_images=[image],
        graphic_layer=layer,
        referenced_frame_number=frame,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(item.outline.points, dtype=np.float64),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                is_filled=False,
                tracking_id=item.tracking_id,
                tracking_uid=item.tracking_uid,
            )
        ],
        text_objects=[
            hd.pr.TextObject(
                text_value=label(item),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=_label_box(item.outline),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        ],
    )


def encode_gsps(
    source_datasets: Sequence[Dataset],
    items: Sequence[GspsNodule],
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
) -> Dataset:
    """Build the GSPS instance.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        Every instance of the series (headers suffice).
    items : sequence of GspsNodule
        Findings with outlines, labelled by their tracking identifier.
    uids : ResultUIDs
        GSPS SeriesInstanceUID and SOPInstanceUID.
    model_name, model_version : str
        ManufacturerModelName and SoftwareVersions.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.pr.GrayscaleSoftcopyPresentationState``.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="Detected lung nodules", display_color=YELLOW
    )
    annotations = []
    for item in items:
        image = by_uid[item.outline.plane.source.sop_instance_uid]
        annotations.append(annotation(item, image, layer))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(source_datasets),
        series_instance_uid=uids.gsps_series_uid,
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=uids.gsps_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="NODULES",
        content_description="Lung nodules (automatic detection)",
        series_description="NoduleAI nodule outlines",
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=[
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=LUNG_WINDOW[0],
                window_width=LUNG_WINDOW[1],
                window_explanation="LUNG",
            )
        ],
    )
    # General Series Laterality is Type 2C on paired body parts (PS3.3 C.7.3.1); naming the
    # (unpaired) body part of the source series tells validators none is needed.
    gsps.BodyPartExamined = str(source_datasets[0].get("BodyPartExamined", "") or "CHEST")
    return gsps
