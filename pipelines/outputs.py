"""The one entry point that turns detected nodules into DICOM result objects.

``encode_results`` is what the worker (and ``noduleai detect``) calls after detection. It writes
nothing to disk and sends nothing; it returns the datasets (SEG, then SR, then GSPS) and the
nodules they actually hold, each with its tracking identifier, tracking UID and segment number,
for the worker to persist (:class:`dicom_node.results.ResultSet`) and deliver. The FHIR
Observations are built from those same nodules, so SR, SEG and FHIR always list the same ones.

* SEG (PS3.3 C.8.20, :mod:`pipelines.seg`): only when there are nodules.
* Comprehensive 3D SR, TID 1500 (:mod:`pipelines.sr`): always; a negative report when there are
  no nodules. Names ``predecessor`` when given (rerun after late instances).
* GSPS (PS3.3 C.11.10, :mod:`pipelines.gsps`): only when there are nodules.
* Key images (Secondary Capture, :mod:`pipelines.keyimages`): one per nodule or mass (none for
  the opacities of diffuse disease: they are many and not focal).
* The IOCM rejection note (:mod:`pipelines.rejection`): only when the study has earlier results
  of other content; it lists every earlier object the new ones replace.

With a prior (:class:`pipelines.priors.PriorFindings`) the nodules and masses are matched to the
prior's (:func:`pipelines.comparison.compare`, on the outline axes every output reports): each
gets its change, volume change and doubling time, its Lung-RADS category by the follow-up rules
(:func:`pipelines.lungrads.followup_category`), and the SR references the prior study; prior
nodules not found again are listed as resolved (:class:`dicom_node.results.PriorComparison`).

Results replace results (:func:`revision`): given the study's earlier results, the new objects
are the next revision (InstanceNumber one more than the latest's, the latest's SR named as
predecessor, the earlier objects rejected), unless they are the latest result again (same input,
same model: same UIDs, same revision, same bytes, nothing new to reject).

Every UID is derived here, once (:mod:`pipelines.uids`), from the source series, its instance set
and the model version: encoding the same input again returns objects with the same UIDs, and
with the same bytes: every date and time highdicom would take from the clock (instance creation,
content, presentation creation, secondary capture, its contributing-equipment entry) is the
``created`` time the caller gives (the worker: when the last instance of the set was received),
and the SEG's Dimension Organization UID is derived too.

Encoder faults are deterministic (the same input fails the same way), so they leave this module as
:class:`~dicom_node.errors.EncodingError`, a permanent error: the job fails at once, unretried.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import Dataset, dcmread

from dicom_node.errors import EncodingError
from dicom_node.results import (
    COMPREHENSIVE_3D_SR,
    GSPS_STORAGE,
    KEY_OBJECT_SELECTION,
    PARAMETRIC_MAP,
    SECONDARY_CAPTURE,
    SEGMENTATION_STORAGE,
    ModelIdentity,
    ObjectKind,
    PriorComparison,
    PriorOutcome,
    ReportedNodule,
    ResolvedNodule,
    ResultObject,
    ResultSet,
)
from pipelines.brock import BrockRisk, Patient, nodule_risk, patient_of
from pipelines.comparison import Change, Measured, Status, compare, lung_rads_growth
from pipelines.findings import Nodule
from pipelines.gsps import GspsNodule, encode_gsps
from pipelines.headers import sop_class_uid, sop_instance_uid
from pipelines.heatmap import encode_heatmap
from pipelines.keyimages import KeyFinding, encode_key_images
from pipelines.lesions import Focus, LesionClass, classify
from pipelines.lungrads import (
    LungRads,
    followup_category,
    mean_diameter_mm,
    nodule_category,
    study_category,
)
from pipelines.masks import Outline, nodule_outline, project_mask, source_planes
from pipelines.priors import PriorFindings
from pipelines.rejection import encode_rejection_note
from pipelines.screen import Heatmap
from pipelines.seg import SegmentInput, encode_segmentation
from pipelines.sr import Assessment, NoduleReport, Predecessor, PriorReference, encode_sr
from pipelines.uids import ResultUIDs, derive_uid
from pipelines.volume import Volume


def _load(sources: Sequence[Dataset | str | Path]) -> list[Dataset]:
    """Datasets as given, or headers read from paths (pixel data is never needed).

    An instance whose SOPInstanceUID or SOPClassUID is empty (anonymised files) is referenced by
    its file meta's, as the volume names it (:func:`pipelines.headers.sop_instance_uid`); a
    dataset given by the caller is copied before it is completed.
    """
    loaded = []
    for source in sources:
        ds = source if isinstance(source, Dataset) else dcmread(source, stop_before_pixels=True)
        uids = {"SOPInstanceUID": sop_instance_uid(ds), "SOPClassUID": sop_class_uid(ds)}
        missing = {k: v for k, v in uids.items() if v and not str(ds.get(k, "") or "")}
        if missing:
            ds = copy.deepcopy(ds) if ds is source else ds
            for keyword, uid in missing.items():
                setattr(ds, keyword, uid)
        loaded.append(ds)
    return loaded


#: The kind of each result object by its SOP Class UID (PS3.4 B.5).
KIND_BY_SOP_CLASS = {
    SEGMENTATION_STORAGE: ObjectKind.SEG,
    COMPREHENSIVE_3D_SR: ObjectKind.SR,
    GSPS_STORAGE: ObjectKind.GSPS,
    SECONDARY_CAPTURE: ObjectKind.KEY_IMAGE,
    PARAMETRIC_MAP: ObjectKind.HEATMAP,
    KEY_OBJECT_SELECTION: ObjectKind.REJECTION,
}
#: Errors highdicom and pydicom raise on content they cannot encode.
_ENCODER_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


@dataclass(frozen=True)
class EncodedResults:
    """What :func:`encode_results` made: the datasets and the nodules they hold.

    ``not_encoded`` counts the detected nodules left out because no stored frame shows them;
    ``instance_number`` is the revision; ``retracted`` the earlier objects' SOP Instance UIDs
    that the rejection note (the last dataset, when there is one) lists; ``prior`` the
    comparison with the prior CT when one was given.
    """

    datasets: list[Dataset]
    nodules: list[ReportedNodule]
    not_encoded: int
    instance_number: int = 1
    retracted: tuple[str, ...] = ()
    prior: PriorComparison | None = None

    @property
    def lung_rads(self) -> str:
        """The study's Lung-RADS v2022 category (:func:`pipelines.lungrads.study_category`)."""
        return study_category(
            (LungRads(n.lung_rads) for n in self.nodules if n.lung_rads),
            diffuse_disease=any(n.lesion_class == LesionClass.DIFFUSE for n in self.nodules),
        ).value


@dataclass(frozen=True)
class Revision:
    """Where a new result stands among the study's earlier ones (:func:`revision`)."""

    uids: ResultUIDs
    predecessor: Predecessor | None


def revision(
    history: Sequence[ResultSet],
    series_uid: str,
    instance_uids: Sequence[str],
    model: str,
    prior: str = "",
) -> Revision:
    """The UIDs and predecessor SR of a new result after ``history``.

    Parameters
    ----------
    history : sequence of ResultSet
        The study's earlier results, oldest first.
    series_uid, instance_uids, model : str, sequence of str, str
        The new result's source series, its instances and the model (``name version``).
    prior : str
        What it was compared with (:func:`pipelines.uids.prior_identity`; "" for nothing).

    Returns
    -------
    Revision
        Revision 1 without history. When the new result is the latest one again (its UIDs at
        the latest's revision equal the latest's), that revision; otherwise the next. The
        predecessor is the last earlier SR other than the new one.
    """
    if not history:
        return Revision(ResultUIDs.create(series_uid, instance_uids, model, prior=prior), None)
    latest = history[-1]
    uids = ResultUIDs.create(series_uid, instance_uids, model, latest.instance_number, prior)
    if uids.sr_instance_uid != latest.sr_uid:
        uids = ResultUIDs.create(
            series_uid, instance_uids, model, latest.instance_number + 1, prior
        )
    earlier_srs = [r.object(ObjectKind.SR) for r in history]
    predecessor = next(
        (
            (sr.study_instance_uid, sr.series_instance_uid, sr.sop_instance_uid)
            for sr in reversed(earlier_srs)
            if sr is not None and sr.sop_instance_uid != uids.sr_instance_uid
        ),
        None,
    )
    return Revision(uids, predecessor)


def replaced(history: Sequence[ResultSet], objects: Sequence[Dataset]) -> list[ResultObject]:
    """The earlier result objects of the study that ``objects`` replace: every one but the
    rejection notes (they stay) and those ``objects`` are again (same UID)."""
    mine = {str(ds.SOPInstanceUID) for ds in objects}
    found: dict[str, ResultObject] = {}
    for result in history:
        for obj in result.objects:
            if obj.kind is not ObjectKind.REJECTION and obj.sop_instance_uid not in mine:
                found.setdefault(obj.sop_instance_uid, obj)
    return list(found.values())


def encode_results(
    source_datasets_or_paths: Sequence[Dataset | str | Path],
    volume: Volume,
    nodules: Sequence[Nodule],
    model: ModelIdentity,
    history: Sequence[ResultSet] = (),
    created: datetime | None = None,
    prior: PriorFindings | None = None,
    heatmap: Heatmap | None = None,
) -> EncodedResults:
    """Encode the findings of one series as SEG, SR (TID 1500), GSPS and a rejection note.

    Parameters
    ----------
    source_datasets_or_paths : sequence of pydicom.Dataset, str or Path
        The instances of the series the Volume was built from (headers suffice; paths are read
        without pixel data). Instances not used by the Volume are ignored.
    volume : Volume
        The volume the nodules were found in (its ``source_positions`` tie slices to frames).
    nodules : sequence of Nodule
        In report order. The ``k``-th nodule that is encoded becomes "Nodule k", segment ``k``,
        with tracking UID ``k - 1`` (:meth:`ResultUIDs.tracking_uid`).
    model : ModelIdentity
        Algorithm identification in every object; part of every derived UID.
    history : sequence of ResultSet, optional
        The study's earlier results, oldest first (:func:`revision`): the new SR names the
        latest other SR in PredecessorDocumentsSequence, the objects carry the revision as
        InstanceNumber, and a rejection note lists the earlier objects replaced.
    created : datetime, optional
        The objects' creation time (a function of the input, so that a redelivered job writes the
        same bytes); the clock when not given.
    prior : PriorFindings, optional
        The patient's prior CT, aligned: the nodules are compared with its nodules.
    heatmap : Heatmap, optional
        Stage 1's screening heatmap: encoded as a Parametric Map over the series
        (:mod:`pipelines.heatmap`), after the key images, with or without nodules.

    Returns
    -------
    EncodedResults
        Datasets ``[SEG, SR, GSPS, key image per nodule]`` with nodules, ``[SR]`` without, then
        the heatmap when given, each followed by the rejection note when earlier objects are
        replaced, and the encoded nodules.
        Nodules whose mask falls on no stored frame (e.g. only on interpolated slices) are left
        out of all three objects and of the nodule list.

    Raises
    ------
    EncodingError
        When there are nodules but none lies on a stored frame (e.g. a Volume resampled onto
        an axial grid from a tilted series has no ``source_positions``): a negative report
        would be false. When the source instances lack the UIDs a reference needs (anonymised
        files read by ``noduleai detect``). Also when highdicom refuses the content.
    """
    try:
        encoded = _encode(source_datasets_or_paths, volume, nodules, model, history, prior, heatmap)
        for ds in encoded.datasets:
            _pin_clock(ds, created or datetime.now(UTC))
        return encoded
    except _ENCODER_ERRORS as exc:
        raise EncodingError(f"result objects could not be encoded: {exc}") from exc


def _encode(
    source_datasets_or_paths: Sequence[Dataset | str | Path],
    volume: Volume,
    nodules: Sequence[Nodule],
    model: ModelIdentity,
    history: Sequence[ResultSet],
    prior: PriorFindings | None,
    heatmap: Heatmap | None,
) -> EncodedResults:
    datasets = _load(source_datasets_or_paths)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    used = [by_uid[uid] for uid in volume.sop_instance_uids if uid in by_uid]
    unnamed = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not all(d.get(k) for d in used)
    ]
    if not used or unnamed:
        # (the node refuses such instances at C-STORE and series selection refuses such series;
        # this guards callers that pass other datasets)
        raise EncodingError(
            f"the series' instances lack {' and '.join(unnamed) or 'SOPInstanceUID'}: "
            "result objects could not reference them"
        )
    compared = "" if prior is None else prior.identity
    place = revision(
        history, volume.series_instance_uid, volume.sop_instance_uids, model.display, compared
    )
    uids, predecessor = place.uids, place.predecessor
    name, version = model.name, model.version
    planes = source_planes(volume, by_uid)
    drawn = []
    for nodule in nodules:
        masks = project_mask(nodule, planes)
        outline = nodule_outline(masks, nodule)
        if outline is not None:
            drawn.append((nodule, masks, outline))
    patient = patient_of(used[0]) if used else Patient(None, None)
    classes = classify([Focus(n.type, o.long_axis_mm, float(n.center_mm[0])) for n, _, o in drawn])
    count = classes.count(LesionClass.NODULE)
    focal = [i for i, kind in enumerate(classes) if kind is not LesionClass.DIFFUSE]
    changes, comparison = _compare([drawn[i] for i in focal], prior)
    change_of = dict(zip(focal, changes, strict=True))
    segments: list[SegmentInput] = []
    reports: list[NoduleReport] = []
    for number, ((nodule, masks, outline), kind) in enumerate(
        zip(drawn, classes, strict=True), start=1
    ):
        tracking_id = f"{kind.label} {number}"
        tracking_uid = uids.tracking_uid(number - 1)
        change = change_of.get(number - 1)
        assessment = assess(nodule, outline, kind, patient, count, change)
        segments.append(SegmentInput(masks, tracking_id, tracking_uid, tracking_id, kind.code))
        reports.append(
            NoduleReport(
                nodule,
                outline,
                tracking_id,
                tracking_uid,
                number,
                assessment,
                change,
                _prior_volume(prior, change),
            )
        )
    if nodules and not reports:
        # a "without findings" SR would be false; the job must fail instead
        raise EncodingError("no nodule lies on a stored frame (volume resampled off the source?)")
    encoded = [_reported(r) for r in reports]
    not_encoded = len(nodules) - len(reports)
    reference = None
    if prior is not None and comparison is not None:
        reference = PriorReference(comparison, prior.evidence)
    if not reports:
        objects = [
            encode_sr([], used, uids, name, version, predecessor=predecessor, prior=reference)
        ]
    else:
        slice_order = [(p.source.sop_instance_uid, p.source.frame_number) for p in planes]
        seg = encode_segmentation(used, slice_order, segments, uids, name, version)
        sr = encode_sr(
            reports,
            used,
            uids,
            name,
            version,
            seg=seg,
            predecessor=predecessor,
            prior=reference,
        )
        gsps = encode_gsps(
            used,
            [
                GspsNodule(
                    r.nodule, r.outline, r.tracking_id, r.tracking_uid, r.assessment.needs_review
                )
                for r in reports
            ],
            uids,
            name,
            version,
        )
        objects = [seg, sr, gsps]
    for ds in objects:  # the encoders write revision 1; a replacing result is the next
        ds.InstanceNumber = uids.revision
    objects += encode_key_images(
        volume,
        by_uid,
        [
            KeyFinding(r.segment_number, r.outline, r.nodule.type, r.assessment)
            for r in reports
            if r.assessment.lesion_class is not LesionClass.DIFFUSE
        ],
        uids,
        name,
        version,
    )
    if heatmap is not None:
        pmap = encode_heatmap(used, planes, heatmap, uids, name, version)
        if pmap is not None:
            pmap.InstanceNumber = uids.revision
            objects.append(pmap)
    rejected = replaced(history, objects)
    if rejected:
        objects.append(encode_rejection_note(rejected, used[0], uids, name, version, uids.revision))
    retracted = tuple(obj.sop_instance_uid for obj in rejected)
    return EncodedResults(objects, encoded, not_encoded, uids.revision, retracted, comparison)


def _prior_volume(prior: PriorFindings | None, change: Change | None) -> float | None:
    """The volume of the prior nodule ``change`` matched, if any."""
    if prior is None or change is None or change.prior is None:
        return None
    return prior.nodules[change.prior].volume_mm3


def _compare(
    drawn: Sequence[tuple[Nodule, object, Outline]], prior: PriorFindings | None
) -> tuple[list[Change | None], PriorComparison | None]:
    """Each focal finding's change against the prior (measured on its outline, as reported),
    and the study's comparison; ``None`` for both without a prior."""
    if prior is None:
        return [None] * len(drawn), None
    now = [
        Measured(n.center_mm, n.volume_mm3, o.long_axis_mm, o.short_axis_mm, n.type)
        for n, _, o in drawn
    ]
    transform = prior.registration.transform
    changes = compare(now, prior.nodules, transform, prior.interval_days)
    resolved = tuple(
        ResolvedNodule(
            prior.nodules[c.prior].centre_mm,
            prior.nodules[c.prior].volume_mm3,
            prior.nodules[c.prior].mean_diameter_mm,
        )
        for c in changes
        if c.status is Status.RESOLVED and c.prior is not None
    )
    comparison = PriorComparison(
        PriorOutcome.COMPARED,
        study_instance_uid=prior.study_instance_uid,
        study_date=prior.study_date.isoformat(),
        interval_days=prior.interval_days,
        findings_from=prior.findings_from,
        rotation_deg=transform.rotation_deg,
        translation_mm=transform.translation_mm,
        resolved=resolved,
    )
    return [c for c in changes if c.current is not None], comparison


#: The Manufacturer highdicom gives its own Contributing Equipment item.
_HIGHDICOM = "Highdicom open-source contributors"


def _pin_clock(ds: Dataset, created: datetime) -> None:
    """Replace what highdicom took from the clock (or drew at random) by values of the input."""
    local = created.astimezone()
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f")
    for prefix in ("InstanceCreation", "Content", "PresentationCreation", "Series"):
        if f"{prefix}Date" in ds:
            setattr(ds, f"{prefix}Date", date)
        if f"{prefix}Time" in ds:
            setattr(ds, f"{prefix}Time", time)
    if "DateOfSecondaryCapture" in ds or "TimeOfSecondaryCapture" in ds:  # key images
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == _HIGHDICOM and "ContributionDateTime" in item:
            item.ContributionDateTime = date + time
    if "DimensionOrganizationSequence" in ds:
        uid = derive_uid("dimension-organization", str(ds.SOPInstanceUID))
        for name in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
            for item in ds.get(name, []):
                if "DimensionOrganizationUID" in item:
                    item.DimensionOrganizationUID = uid


def assess(
    nodule: Nodule,
    outline: Outline,
    lesion_class: LesionClass,
    patient: Patient,
    nodules: int,
    change: Change | None = None,
) -> Assessment:
    """Lung-RADS category and Brock risk of one finding from its outline's axes and its class
    (:mod:`pipelines.lesions`); ``nodules`` is the study's count of class ``nodule``; with its
    ``change`` against a prior, the category follows the follow-up rules."""
    mean = mean_diameter_mm(outline.long_axis_mm, outline.short_axis_mm)
    solid_mean = mean_diameter_mm(nodule.solid_long_axis_mm, nodule.solid_short_axis_mm)
    if lesion_class is LesionClass.DIFFUSE:
        reason = "no risk: part of diffuse disease, not a nodule"
        return Assessment(lesion_class, mean, solid_mean, "", BrockRisk(None, reason), True)
    category = _category(nodule.type, mean, solid_mean, change).value
    if lesion_class is LesionClass.MASS:
        reason = "no risk: a mass (over 30 mm), outside the nodules the Brock model was built on"
        return Assessment(lesion_class, mean, solid_mean, category, BrockRisk(None, reason), True)
    risk = nodule_risk(patient, outline.long_axis_mm, nodule.type, nodule.upper_zone, nodules)
    return Assessment(lesion_class, mean, solid_mean, category, risk, bool(nodule.needs_review))


def _category(attenuation: str, mean: float, solid_mean: float, change: Change | None) -> LungRads:
    """Baseline category, or the follow-up category given the change against a prior."""
    if change is None:
        return nodule_category(attenuation, mean, solid_mean)
    prior_mean = None
    if change.mean_diameter_change_mm is not None:
        prior_mean = round(mean - change.mean_diameter_change_mm, 1)
    return followup_category(
        attenuation,
        mean,
        solid_mean,
        change.status.value,
        lung_rads_growth(change),
        change.interval_days,
        prior_mean,
    )


def _reported(report: NoduleReport) -> ReportedNodule:
    """The record every output shares for one encoded nodule: its axes are those measured on the
    outline the SR draws (the same values in SR, FHIR, JSON and its Lung-RADS category)."""
    n, outline, assessed, change = report.nodule, report.outline, report.assessment, report.change
    x, y, z = (float(v) for v in n.center_mm)

    return ReportedNodule(
        number=report.segment_number,
        tracking_id=report.tracking_id,
        tracking_uid=report.tracking_uid,
        segment_number=report.segment_number,
        center_mm=(x, y, z),
        long_axis_mm=outline.long_axis_mm,
        short_axis_mm=outline.short_axis_mm,
        volume_mm3=float(n.volume_mm3),
        mean_hu=float(n.mean_hu),
        type=n.type,
        probability=float(n.probability),
        needs_review=assessed.needs_review,
        mean_diameter_mm=assessed.mean_diameter_mm,
        solid_mean_diameter_mm=assessed.solid_mean_diameter_mm,
        lung_rads=assessed.lung_rads,
        lesion_class=assessed.lesion_class.value,
        side="left" if x > 0 else "right",
        upper_zone=None if n.upper_zone is None else bool(n.upper_zone),
        malignancy_risk=assessed.risk.probability,
        risk_note=assessed.risk.note,
        change="" if change is None else change.status.value,
        prior_volume_mm3=report.prior_volume_mm3,
        volume_change_percent=None if change is None else change.volume_change_percent,
        doubling_time_days=None if change is None else change.doubling_time_days,
    )
