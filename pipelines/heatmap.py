"""The stage-1 screening heatmap as a DICOM Parametric Map over the source CT (explainability).

Stage 1 scores every voxel of the lungs' box for "a nodule centre is here" (0-1,
:func:`pipelines.screen.screen_volume`); its local maxima are the candidates stage 2 refines.
Shown over the CT, it says where the detector looked and what it considered, also where stage 2
then decided "no nodule".

The object is a Parametric Map (PS3.3 A.75; ``highdicom.pm.ParametricMap``) in the source study,
its own series (:data:`HEATMAP_SERIES_NUMBER`), one 32-bit float frame per stored CT frame at the
CT's own rows, columns and positions, the score sampled trilinearly at every pixel centre (0
outside the lungs' box), with a Real World Value Mapping that says the values are unitless scores
from 0 to 1. Why this shape: it is the form OHIF 3 draws as an overlay (its
``cornerstone-dicom-pmap`` extension): a volume viewport fusing the PMAP over its referenced CT,
which needs the PMAP's frames to match the CT's images one to one (same rows and columns, frames
in the order of the CT volume: increasing along the slice normal), and reads ``FloatPixelData``
(it shows values times 100 with a 0-100 window, so a 0-1 score uses the whole colour map). A
FRACTIONAL Segmentation would be smaller (8 bits, empty frames omitted) but OHIF 3.13 refuses it
("Fractional segmentations are not yet supported").

Size: 4 bytes per CT pixel (about 140 MB for 133 slices of 512 x 512), so the heatmap is off by
default (``NODULEAI_HEATMAP``); ``benchmarks/outputs.py`` measures what it adds to a job.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node.results import MANUFACTURER
from pipelines.masks import SourcePlane, grid_corners, sample_on_plane
from pipelines.screen import Heatmap
from pipelines.seg import DEVICE_SERIAL_NUMBER
from pipelines.uids import ResultUIDs

HEATMAP_SERIES_NUMBER = 9705
#: UCUM "1": a unitless quantity (the score).
UNITLESS = Code("1", "UCUM", "no units")


def heatmap_frames(heatmap: Heatmap, planes: Sequence[SourcePlane]) -> npt.NDArray[np.float32]:
    """The heatmap sampled on every plane: ``(len(planes), rows, columns)`` float32."""
    head = planes[0]
    frames = np.zeros((len(planes), head.rows, head.columns), dtype=np.float32)
    corners = grid_corners(heatmap.values.shape, heatmap.origin_mm, heatmap.spacing_mm)
    for i, plane in enumerate(planes):
        sampled = sample_on_plane(
            heatmap.values, heatmap.origin_mm, heatmap.spacing_mm, plane, corners
        )
        if sampled is not None:
            frames[i] = np.clip(sampled, 0.0, 1.0)
    return frames


def encode_heatmap(
    source_datasets: Sequence[Dataset],
    planes: Sequence[SourcePlane],
    heatmap: Heatmap,
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
) -> Dataset | None:
    """The Parametric Map of ``heatmap`` over the stored frames ``planes``.

    Returns ``None`` (no heatmap object) when the series does not have one single-frame instance
    per plane, all of one size: the form a viewer can overlay frame by frame (an Enhanced CT or a
    series of mixed sizes is left without one).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    if not planes or any(
        p.source.frame_number is not None
        or p.source.sop_instance_uid not in by_uid
        or (p.rows, p.columns) != (planes[0].rows, planes[0].columns)
        for p in planes
    ):
        return None
    normal = planes[0].normal
    ordered = sorted(planes, key=lambda p: float(p.position @ normal))
    images = [by_uid[p.source.sop_instance_uid] for p in ordered]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SCORE",
        lut_explanation="Stage-1 nodule-centre score (0-1)",
        unit=UNITLESS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    series_uid, sop_uid = uids.heatmap_uids()
    pmap = hd.pm.ParametricMap(
        source_images=images,
        pixel_array=heatmap_frames(heatmap, ordered),
        series_instance_uid=series_uid,
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="HEATMAP",
        content_description="Nodule screening heatmap (stage 1, automatic)",
        series_description="NoduleAI screening heatmap",
    )
    # General Series Laterality is Type 2C on paired body parts (PS3.3 C.7.3.1): the chest is
    # not one, and naming it keeps validators from asking for laterality.
    pmap.BodyPartExamined = "CHEST"
    _frames_along_normal(pmap, normal)
    return pmap


def _frames_along_normal(pmap: Dataset, normal: npt.NDArray[np.float64]) -> None:
    """Put the frames in increasing order along the slice normal (row x column cosine).

    highdicom writes them in its own volume order (decreasing for axial images); OHIF's PMAP
    loader copies the frames into its CT volume, which is in increasing order, without matching
    them by position. Each frame keeps its own functional groups (position, source image,
    dimension index), so the object means the same in either order.
    """
    groups = list(pmap.PerFrameFunctionalGroupsSequence)
    heights = [
        float(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient) @ normal) for g in groups
    ]
    order = np.argsort(heights, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    frames = np.frombuffer(pmap.FloatPixelData, dtype="<f4").reshape(len(groups), -1)
    pmap.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    pmap.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
