"""Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report of the nodules.

Content tree (PS3.16 TID 1500 Measurement Report):

* Language, observation context (TID 1001: the NoduleAI device as observer, TID 1004),
  procedure reported "CT of chest", an image library (TID 1600) of the source images.
* Per nodule, in the Imaging Measurements container:

  - a **TID 1410** Planar ROI group: a closed POLYLINE SCOORD (first point repeated) on the stored
    image of largest extent, in image coordinates (PS3.3 C.18.6.1.1), with the long axis
    (SCT 103339001 "Long Axis") and short axis (SCT 103340004 "Short Axis") in mm, both measured
    on that polyline (:class:`pipelines.masks.Outline`). Viewers such
    as OHIF draw only groups that carry a 2D outline; OHIF labels it with these NUMs.
  - a **TID 1411** Volumetric ROI group referencing the nodule's SEG segment, with the volume
    (SCT 118565006 "Volume", mm3), the mean attenuation (DCM 112031 "Attenuation Coefficient"
    derived by SCT 373098007 "Mean", UCUM [hnsf'U]), the detection probability (DCM 111012
    "Certainty of Finding", the CAD concept for how sure the algorithm is that the finding is
    real, in UCUM %: it is not a malignancy probability), and qualitative evaluations: the
    attenuation type (:data:`TYPE_CONCEPT`) and whether a radiologist should review it
    (:data:`REVIEW_CONCEPT`, SCT 373066001 Yes / 373067005 No), its Lung-RADS v2022 category
    (:data:`LUNG_RADS_CONCEPT`, :mod:`pipelines.lungrads`) and, where age and sex are known, its
    Brock probability of cancer (DCM 111047 "Probability of cancer", %, algorithm "Brock (PanCan)
    full model", :mod:`pipelines.brock`).

  Both groups carry the finding's class as finding type (:class:`pipelines.lesions.LesionClass`:
  "Nodule" SCT 27925004, "Mass" SCT 4147007, "Opacity" DCM 112001 for diffuse disease),
  finding site "Lung" (SCT 39607008),
  the algorithm (name, version) and the same tracking identifier ``Nodule <n>`` and
  TrackingUniqueIdentifier (derived, so it persists across reruns of the same input; OHIF merges
  groups sharing it into one annotation labelled with all their measurements). The identifier
  names the class: ``Nodule 1``, ``Mass 2``, ``Opacity 3``.

* A Qualitative Evaluations container (TID 1500 row "Qualitative Evaluations", UMLS C0034375) with
  DCM 111017 "CAD Processing and Findings Summary": DCM 111242 "All algorithms succeeded; with
  findings", or DCM 111241 "All algorithms succeeded; without findings" for a **negative report**.
  A negative report has no Imaging Measurements container: TID 1500 requires at least one of
  Imaging Measurements, Derived Imaging Measurements or Qualitative Evaluations, and an empty
  measurement container is not allowed.

A rerun after late instances names the earlier SR in PredecessorDocumentsSequence
(PS3.3 C.17.2.3, SR Document General Module).

:func:`read_findings` reads the nodules back from such a document (a prior study's report
retrieved from the PACS), so that a prior is not analysed twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_node.results import (
    COMPREHENSIVE_3D_SR,
    MANUFACTURER,
    SEGMENTATION_STORAGE,
    PriorComparison,
)
from pipelines.brock import BrockRisk
from pipelines.comparison import Change, Measured, Status
from pipelines.findings import Nodule
from pipelines.lesions import LesionClass
from pipelines.masks import Outline
from pipelines.uids import ResultUIDs, derive_uid

SR_SERIES_NUMBER = 9702

#: Private coding scheme for concepts no standard code covers (PS3.3 8.2: 99 prefix).
PRIVATE_SCHEME = "99NODULEAI"
#: Its declaration in the SR (Coding Scheme Identification Sequence, PS3.3 C.12.1.1.1).
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="NoduleAI lung nodule concepts",
    responsible_organization="NoduleAI",
)
#: Qualitative evaluation "attenuation type" (no standard concept name for it).
TYPE_CONCEPT = hd.sr.CodedConcept("NAI-0001", PRIVATE_SCHEME, "Nodule attenuation type")
#: Qualitative evaluation "radiologist review recommended" (uncertain detection).
REVIEW_CONCEPT = hd.sr.CodedConcept("NAI-0002", PRIVATE_SCHEME, "Radiologist review recommended")
#: Qualitative evaluation "Lung-RADS v2022 category" (ACR; no standard code we could verify).
LUNG_RADS_CONCEPT = hd.sr.CodedConcept(
    "NAI-0004", PRIVATE_SCHEME, "Lung-RADS v2022 assessment category"
)
#: Qualitative evaluation of a nodule against the prior study (DCM 111424), with SNOMED CT
#: values; its volume change and volume doubling time have no standard concept: private.
CHANGE_CONCEPT = codes.DCM.ComparisonToPreviousStudies
CHANGE_VALUES = {
    Status.NEW: codes.SCT.NewFinding,
    Status.STABLE: codes.SCT.NoSignificantChangesInTheFinding,
    Status.GROWN: codes.SCT.IncreasedSize,
    Status.SHRUNK: codes.SCT.DecreasedSize,
    Status.RESOLVED: codes.SCT.Absent,
}
VOLUME_CHANGE_CONCEPT = hd.sr.CodedConcept(
    "NAI-0005", PRIVATE_SCHEME, "Volume change since prior study"
)
DOUBLING_TIME_CONCEPT = hd.sr.CodedConcept("NAI-0006", PRIVATE_SCHEME, "Volume doubling time")
COMPARISON_SUMMARY_CONCEPT = hd.sr.CodedConcept(
    "NAI-0007", PRIVATE_SCHEME, "Comparison with prior study"
)
#: The Brock model as the algorithm of the probability of cancer (DCM 111047).
BROCK_ALGORITHM = hd.sr.AlgorithmIdentification(
    name="Brock (PanCan) full model", version="McWilliams 2013"
)


def lung_rads_value(category: str) -> hd.sr.CodedConcept:
    """The Lung-RADS category as a coded value (private scheme)."""
    return hd.sr.CodedConcept(f"NAI-LR-{category}", PRIVATE_SCHEME, f"Lung-RADS {category}")


#: Attenuation type values: SCT 35702001 "Solid", DCM 112120 "Ground glass opacity"; part-solid
#: has no single SNOMED CT concept in the international release, so it is private.
TYPE_VALUES = {
    "solid": hd.sr.CodedConcept("35702001", "SCT", "Solid"),
    "part-solid": hd.sr.CodedConcept("NAI-0003", PRIVATE_SCHEME, "Part-solid"),
    "ground-glass": hd.sr.CodedConcept("112120", "DCM", "Ground glass opacity"),
}
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
CAD_SUMMARY = codes.DCM.CADProcessingAndFindingsSummary
#: Procedure reported (CID 100 Quantitative Diagnostic Imaging Procedures): LOINC "CT Chest".
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")

Predecessor = Dataset | tuple[str, str, str]


@dataclass(frozen=True)
class Assessment:
    """A finding's clinical assessment: its class, Lung-RADS (from its outline's mean diameter;
    "" for diffuse disease), risk, and whether a radiologist should review it."""

    lesion_class: LesionClass
    mean_diameter_mm: float
    solid_mean_diameter_mm: float
    lung_rads: str
    risk: BrockRisk
    needs_review: bool


@dataclass(frozen=True)
class NoduleReport:
    """One nodule as the SR reports it."""

    nodule: Nodule
    outline: Outline
    tracking_id: str
    tracking_uid: str
    segment_number: int
    assessment: Assessment
    #: Against the prior CT (``None``: not compared) and the matched prior nodule's volume.
    change: Change | None = None
    prior_volume_mm3: float | None = None


@dataclass(frozen=True)
class PriorReference:
    """The prior CT a report was compared with: its instances (listed as pertinent other
    evidence, PS3.3 C.17.2.3) and the comparison (summarised in the report)."""

    comparison: PriorComparison
    evidence: Sequence[Dataset]


def algorithm(model_name: str, model_version: str) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for measurements."""
    return hd.sr.AlgorithmIdentification(name=model_name, version=model_version)


def _mm(
    name: hd.sr.CodedConcept, value: float, algo: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=round(float(value), 2), unit=codes.UCUM.Millimeter, algorithm_id=algo
    )


def planar_group(
    report: NoduleReport, algo: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: closed POLYLINE on the largest slice, long and short axis."""
    plane = report.outline.plane
    frames = None if plane.source.frame_number is None else [plane.source.frame_number]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(report.outline.points, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=plane.sop_class_uid,
            referenced_sop_instance_uid=plane.source.sop_instance_uid,
            referenced_frame_numbers=frames,
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=report.tracking_uid, identifier=report.tracking_id
        ),
        referenced_region=region,
        finding_type=report.assessment.lesion_class.code,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=[
            _mm(codes.SCT.LongAxis, report.outline.long_axis_mm, algo),
            _mm(codes.SCT.ShortAxis, report.outline.short_axis_mm, algo),
        ],
    )


def volumetric_group(
    report: NoduleReport,
    algo: hd.sr.AlgorithmIdentification,
    seg_instance_uid: str,
    source_series_uid: str,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: the SEG segment, volume, mean HU, probability, type, review flag."""
    nodule = report.nodule
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=round(float(nodule.volume_mm3), 1),
            unit=codes.UCUM.CubicMillimeter,
            algorithm_id=algo,
        ),
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(100.0 * float(nodule.probability), 1),
            unit=codes.UCUM.Percent,
            algorithm_id=algo,
        ),
    ]
    if np.isfinite(nodule.mean_hu):
        measurements.insert(
            1,
            hd.sr.Measurement(
                name=codes.DCM.AttenuationCoefficient,
                value=round(float(nodule.mean_hu), 1),
                unit=codes.UCUM.HounsfieldUnit,
                derivation=codes.SCT.Mean,
                algorithm_id=algo,
            ),
        )
    assessment = report.assessment
    if assessment.risk.probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=round(100.0 * assessment.risk.probability, 2),
                unit=codes.UCUM.Percent,
                algorithm_id=BROCK_ALGORITHM,
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(name=TYPE_CONCEPT, value=TYPE_VALUES[nodule.type]),
        hd.sr.QualitativeEvaluation(
            name=REVIEW_CONCEPT, value=codes.SCT.Yes if assessment.needs_review else codes.SCT.No
        ),
    ]
    if assessment.lung_rads:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=LUNG_RADS_CONCEPT, value=lung_rads_value(assessment.lung_rads)
            )
        )
    if report.change is not None:
        measurements += _change_measurements(report.change, algo)
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=CHANGE_CONCEPT, value=CHANGE_VALUES[report.change.status]
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=report.tracking_uid, identifier=report.tracking_id
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=SEGMENTATION_STORAGE,
            sop_instance_uid=seg_instance_uid,
            segment_number=report.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        ),
        finding_type=report.assessment.lesion_class.code,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _change_measurements(
    change: Change, algo: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """Volume change since the prior (%) and, for a grown nodule, volume doubling time (d)."""
    found = []
    if change.volume_change_percent is not None:
        found.append(
            hd.sr.Measurement(
                name=VOLUME_CHANGE_CONCEPT,
                value=round(change.volume_change_percent, 1),
                unit=codes.UCUM.Percent,
                algorithm_id=algo,
            )
        )
    if change.doubling_time_days is not None:
        found.append(
            hd.sr.Measurement(
                name=DOUBLING_TIME_CONCEPT,
                value=round(change.doubling_time_days),
                unit=codes.UCUM.Day,
                algorithm_id=algo,
            )
        )
    return found


def _comparison_items(comparison: PriorComparison) -> list[hd.sr.ContentItem]:
    """The summary's account of the prior: its Study Instance UID, and a sentence naming the
    interval and each prior nodule not found again (PS3.16 TID 1500 qualitative evaluations)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    resolved = [
        f"prior nodule at ({r.center_mm[0]:.0f}, {r.center_mm[1]:.0f}, {r.center_mm[2]:.0f}) mm "
        f"of the prior, {r.volume_mm3:.0f} mm3, mean diameter {r.mean_diameter_mm:.1f} mm: "
        "not found again (resolved)"
        for r in comparison.resolved
    ]
    text = (
        f"Compared with the prior CT of {comparison.study_date} "
        f"({comparison.interval_days:.0f} days earlier; aligned by "
        f"{comparison.rotation_deg:.1f} deg, {comparison.translation_mm:.1f} mm)."
        + "".join(f" {line[0].upper()}{line[1:]}." for line in resolved)
    )
    return [
        hd.sr.UIDRefContentItem(
            name=codes.DCM.StudyInstanceUID,
            value=comparison.study_instance_uid,
            relationship_type=contains,
        ),
        hd.sr.TextContentItem(
            name=COMPARISON_SUMMARY_CONCEPT, value=text[:1024], relationship_type=contains
        ),
    ]


def device_observer(model_name: str, model_version: str) -> hd.sr.ObserverContext:
    """TID 1004 Device Observer Identifying Attributes: NoduleAI and its model."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", model_name, model_version),
            name="NoduleAI",
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
        ),
    )


def observation_context(model_name: str, model_version: str) -> hd.sr.ObservationContext:
    """TID 1001 with the device observer (TID 1004): NoduleAI and its model."""
    return hd.sr.ObservationContext(
        observer_device_context=device_observer(model_name, model_version)
    )


def _summary_container(
    found: bool, comparison: PriorComparison | None = None
) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    value = (
        codes.DCM.AllAlgorithmsSucceededWithFindings
        if found
        else codes.DCM.AllAlgorithmsSucceededWithoutFindings
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=CAD_SUMMARY,
            value=value,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    if comparison is not None:
        items += _comparison_items(comparison)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _library(reports: Sequence[NoduleReport], source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """TID 1600 Image Library entries: the images the outlines are drawn on (not the whole
    series, which the evidence sequence already lists; 133 entries cost seconds in highdicom)."""
    wanted = {r.outline.plane.source.sop_instance_uid for r in reports}
    # highdicom 0.28's TID 1602 descriptors read top-level PixelSpacing, which multi-frame
    # (Enhanced CT) instances keep in functional groups: those are left out (the library is
    # optional in TID 1500; the SCOORDs still reference them by frame number).
    return [
        ds
        for ds in source_datasets
        if str(ds.SOPInstanceUID) in wanted and "PerFrameFunctionalGroupsSequence" not in ds
    ]


def measurement_report(
    reports: Sequence[NoduleReport],
    source_datasets: Sequence[Dataset],
    model_name: str,
    model_version: str,
    seg_instance_uid: str | None,
    source_series_uid: str,
    comparison: PriorComparison | None = None,
) -> hd.sr.MeasurementReport:
    """TID 1500 content: positive (TID 1410 + 1411 per nodule) or negative; with the
    comparison with a prior CT in the summary when there is one."""
    algo = algorithm(model_name, model_version)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for report in reports:
        groups.append(planar_group(report, algo))
        if seg_instance_uid is not None:
            groups.append(volumetric_group(report, algo, seg_instance_uid, source_series_uid))
    negative = not groups
    if negative:
        # highdicom requires one group; build with a placeholder and drop the container below
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derive_uid("placeholder"), identifier="placeholder"
                )
            )
        ]
    content = hd.sr.MeasurementReport(
        observation_context=observation_context(model_name, model_version),
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
        referenced_images=_library(reports, source_datasets) or None,
    )
    root = content[0]
    if negative:
        root.ContentSequence = hd.sr.ContentSequence(
            [
                item
                for item in root.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value
            ]
        )
    root.ContentSequence.append(_summary_container(not negative, comparison))
    return content


def predecessor_sequence(predecessor: Predecessor) -> list[Dataset]:
    """PredecessorDocumentsSequence (PS3.3 C.17.2.3) naming one earlier SR."""
    if isinstance(predecessor, Dataset):
        study = str(predecessor.StudyInstanceUID)
        series = str(predecessor.SeriesInstanceUID)
        sop = str(predecessor.SOPInstanceUID)
        sop_class = str(predecessor.get("SOPClassUID", COMPREHENSIVE_3D_SR))
    else:
        study, series, sop = predecessor
        sop_class = COMPREHENSIVE_3D_SR
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop
    series_item = Dataset()
    series_item.SeriesInstanceUID = series
    series_item.ReferencedSOPSequence = DicomSequence([ref])
    study_item = Dataset()
    study_item.StudyInstanceUID = study
    study_item.ReferencedSeriesSequence = DicomSequence([series_item])
    return [study_item]


def encode_sr(
    reports: Sequence[NoduleReport],
    source_datasets: Sequence[Dataset],
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
    seg: Dataset | None = None,
    predecessor: Predecessor | None = None,
    prior: PriorReference | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR document.

    Parameters
    ----------
    reports : sequence of NoduleReport
        Nodules with their outlines; empty for a negative report.
    source_datasets : sequence of pydicom.Dataset
        The source series (evidence and image library); headers suffice.
    uids : ResultUIDs
        SR SeriesInstanceUID and SOPInstanceUID.
    model_name, model_version : str
        Algorithm identification and observer device.
    seg : pydicom.Dataset, optional
        The SEG the TID 1411 groups reference (also listed as evidence); without it, no
        volumetric groups are written.
    predecessor : pydicom.Dataset or (str, str, str), optional
        The SR this one replaces (an earlier run on fewer instances), as a dataset or its
        ``(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)``.
    prior : PriorReference, optional
        The prior CT compared with: summarised in the report, its instances listed in
        PertinentOtherEvidenceSequence.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sr.Comprehensive3DSR`` (COMPLETE, UNVERIFIED).
    """
    content = measurement_report(
        reports,
        source_datasets,
        model_name,
        model_version,
        None if seg is None else str(seg.SOPInstanceUID),
        uids.source_series_uid,
        None if prior is None else prior.comparison,
    )
    evidence: list[Dataset] = [*source_datasets, *([seg] if seg is not None else [])]
    if prior is not None:  # another study's instances: PertinentOtherEvidenceSequence
        evidence += prior.evidence
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=uids.sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="NoduleAI nodule report",
        coding_schemes=[PRIVATE_SCHEME_ITEM],
    )
    if predecessor is not None:
        sr.PredecessorDocumentsSequence = predecessor_sequence(predecessor)
    return sr


# ---------------------------------------------------------------------------------- reading


def _code(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    seq = item.get(attribute)
    if not seq:
        return "", ""
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _items(item: Dataset) -> Iterator[Dataset]:
    yield from item.get("ContentSequence", [])


@dataclass
class _Read:
    """What one tracking UID's groups say."""

    volume_mm3: float | None = None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    attenuation: str = "solid"
    centre_mm: tuple[float, float, float] | None = None


def _numeric(item: Dataset) -> float | None:
    values = item.get("MeasuredValueSequence")
    return float(values[0].NumericValue) if values else None


def _polyline_centre(
    region: Dataset, images: Mapping[str, Dataset]
) -> tuple[float, float, float] | None:
    """Centre of a SCOORD polyline in patient coordinates, from the image it lies on."""
    refs = [r for child in _items(region) for r in child.get("ReferencedSOPSequence", [])]
    image = images.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
    if image is None or "ImagePositionPatient" not in image:
        return None
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
    if len(points) > 1 and np.allclose(points[0], points[-1]):
        points = points[:-1]
    column, row = points.mean(axis=0) - 0.5  # image coordinates: (0, 0) is a pixel's corner
    orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    spacing = [float(v) for v in image.PixelSpacing]
    centre = (
        np.asarray(image.ImagePositionPatient, dtype=np.float64)
        + column * spacing[1] * orientation[:3]
        + row * spacing[0] * orientation[3:]
    )
    return (float(centre[0]), float(centre[1]), float(centre[2]))


def _read_group(group: Dataset, read: _Read, images: Mapping[str, Dataset]) -> None:
    types = {(c.value, c.scheme_designator): name for name, c in TYPE_VALUES.items()}
    for item in _items(group):
        concept = _code(item)
        if concept == (codes.SCT.Volume.value, "SCT"):
            read.volume_mm3 = _numeric(item)
        elif concept == (codes.SCT.LongAxis.value, "SCT"):
            read.long_axis_mm = _numeric(item)
        elif concept == (codes.SCT.ShortAxis.value, "SCT"):
            read.short_axis_mm = _numeric(item)
        elif concept == (TYPE_CONCEPT.value, PRIVATE_SCHEME):
            read.attenuation = types.get(_code(item, "ConceptCodeSequence"), "solid")
        elif item.get("ValueType") == "SCOORD" and read.centre_mm is None:
            read.centre_mm = _polyline_centre(item, images)


def read_findings(sr: Dataset, images: Mapping[str, Dataset]) -> list[Measured]:
    """The nodules of one of our TID 1500 reports (:func:`encode_sr`), for comparison.

    Per tracking UID: volume (TID 1411), long and short axis (TID 1410), attenuation type, and a
    centre: the mean of the outline's points on the image it is drawn on (``images``: headers
    by SOPInstanceUID): the in-plane centre of its largest slice, near the 3D centre (within a
    slice and a pixel for a round nodule, a few mm for a large irregular lesion; the matching
    bound is at least 8 mm or the long axis). Groups lacking a
    volume, axes or a locatable outline are skipped; a negative report gives no nodules.
    """
    found: dict[str, _Read] = {}
    containers = [c for c in _items(sr) if _code(c) == (codes.DCM.ImagingMeasurements.value, "DCM")]
    for container in containers:
        for group in _items(container):
            uid = next(
                (
                    str(i.UID)
                    for i in _items(group)
                    if _code(i) == (codes.DCM.TrackingUniqueIdentifier.value, "DCM")
                ),
                None,
            )
            if uid is not None:
                _read_group(group, found.setdefault(uid, _Read()), images)
    return [
        Measured(r.centre_mm, r.volume_mm3, r.long_axis_mm, r.short_axis_mm, r.attenuation)
        for r in found.values()
        if r.centre_mm is not None
        and r.volume_mm3 is not None
        and r.long_axis_mm is not None
        and r.short_axis_mm is not None
    ]
