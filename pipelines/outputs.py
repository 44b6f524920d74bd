"""The one entry point that turns detected nodules into DICOM result objects.

``encode_results`` is what the worker calls after detection. It writes nothing to disk and sends
nothing; it returns the datasets (SEG, then SR, then GSPS) for the worker to persist and deliver.

* SEG (PS3.3 C.8.20, :mod:`pipelines.seg`): only when there are nodules.
* Comprehensive 3D SR, TID 1500 (:mod:`pipelines.sr`): always; a negative report when there are
  no nodules. Names ``predecessor`` when given (rerun after late instances).
* GSPS (PS3.3 C.11.10, :mod:`pipelines.gsps`): only when there are nodules.

Every UID is derived (:mod:`pipelines.uids`) from the source series, its instance set and the
model version: encoding the same input again returns objects with the same UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from pipelines.findings import Nodule
from pipelines.gsps import GspsNodule, encode_gsps
from pipelines.masks import nodule_outline, project_mask, source_planes
from pipelines.seg import SegmentInput, encode_segmentation
from pipelines.sr import NoduleReport, Predecessor, encode_sr
from pipelines.uids import ResultUIDs
from pipelines.volume import Volume


def _load(sources: Sequence[Dataset | str | Path]) -> list[Dataset]:
    """Datasets as given, or headers read from paths (pixel data is never needed)."""
    return [s if isinstance(s, Dataset) else dcmread(s, stop_before_pixels=True) for s in sources]


def model_identity(model_name: str, model_version: str) -> str:
    """The string UIDs depend on: name and version."""
    return f"{model_name} {model_version}"


def encode_results(
    source_datasets_or_paths: Sequence[Dataset | str | Path],
    volume: Volume,
    nodules: Sequence[Nodule],
    model_name: str,
    model_version: str,
    predecessor: Predecessor | None = None,
) -> list[Dataset]:
    """Encode the findings of one series as SEG, SR (TID 1500) and GSPS.

    Parameters
    ----------
    source_datasets_or_paths : sequence of pydicom.Dataset, str or Path
        The instances of the series the Volume was built from (headers suffice; paths are read
        without pixel data). Instances not used by the Volume are ignored.
    volume : Volume
        The volume the nodules were found in (its ``source_positions`` tie slices to frames).
    nodules : sequence of Nodule
        In report order; nodule ``i`` becomes "Nodule i+1", segment ``i+1``.
    model_name, model_version : str
        Algorithm identification in every object; part of every derived UID.
    predecessor : pydicom.Dataset or (str, str, str), optional
        The SR of an earlier run on this series (a different instance set); the new SR lists it in
        PredecessorDocumentsSequence. Ignored when it is the SR this call produces (same UIDs).

    Returns
    -------
    list of pydicom.Dataset
        ``[SEG, SR, GSPS]`` with nodules, ``[SR]`` without. Nodules whose mask falls on no stored
        frame (e.g. only on interpolated slices) are left out of all three objects.

    Raises
    ------
    ValueError
        When there are nodules but none lies on a stored frame (e.g. a Volume resampled onto
        an axial grid from a tilted series has no ``source_positions``): a negative report
        would be false.
    """
    datasets = _load(source_datasets_or_paths)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    used = [by_uid[uid] for uid in volume.sop_instance_uids if uid in by_uid]
    uids = ResultUIDs.create(
        volume.series_instance_uid,
        volume.sop_instance_uids,
        model_identity(model_name, model_version),
    )
    planes = source_planes(volume, by_uid)
    segments: list[SegmentInput] = []
    reports: list[NoduleReport] = []
    for index, nodule in enumerate(nodules):
        masks = project_mask(nodule, planes)
        outline = nodule_outline(masks, nodule)
        if outline is None:
            continue
        tracking_id = f"Nodule {index + 1}"
        tracking_uid = uids.tracking_uid(index)
        segments.append(SegmentInput(masks, tracking_id, tracking_uid, tracking_id))
        reports.append(
            NoduleReport(nodule, outline, tracking_id, tracking_uid, segment_number=len(segments))
        )
    if predecessor is not None and _same_sr(predecessor, uids.sr_instance_uid):
        predecessor = None
    if nodules and not reports:
        # a "without findings" SR would be false; the caller must fail the job instead
        raise ValueError("no nodule lies on a stored frame (volume resampled off the source?)")
    if not reports:
        return [encode_sr([], used, uids, model_name, model_version, predecessor=predecessor)]
    slice_order = [(p.source.sop_instance_uid, p.source.frame_number) for p in planes]
    seg = encode_segmentation(used, slice_order, segments, uids, model_name, model_version)
    sr = encode_sr(reports, used, uids, model_name, model_version, seg=seg, predecessor=predecessor)
    gsps = encode_gsps(
        used,
        [GspsNodule(r.nodule, r.outline, r.tracking_id, r.tracking_uid) for r in reports],
        uids,
        model_name,
        model_version,
    )
    return [seg, sr, gsps]


def _same_sr(predecessor: Predecessor, sop_instance_uid: str) -> bool:
    uid = str(predecessor.SOPInstanceUID) if isinstance(predecessor, Dataset) else predecessor[2]
    return uid == sop_instance_uid
