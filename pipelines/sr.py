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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_node.results import COMPREHENSIVE_3D_SR, MANUFACTURER, SEGMENTATION_STORAGE
from pipelines.brock import BrockRisk
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


def _summary_container(found: bool) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    value = (
        codes.DCM.AllAlgorithmsSucceededWithFindings
        if found
        else codes.DCM.AllAlgorithmsSucceededWithoutFindings
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=CAD_SUMMARY,
                value=value,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
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
) -> hd.sr.MeasurementReport:
    """TID 1500 content: positive (TID 1410 + 1411 per nodule) or negative."""
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
    root.ContentSequence.append(_summary_container(not negative))
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
    )
    evidence: list[Dataset] = [*source_datasets, *([seg] if seg is not None else [])]
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
