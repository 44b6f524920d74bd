"""The typed result of one job: what the worker stored, what delivery ships, what the API shows.

The worker (:mod:`pipelines.worker`) builds one :class:`ResultSet` per job from what the encoders
actually wrote, persists its artifacts under the job's results folder in the spool
(``results/<job>/<attempt>/``: the DICOM objects, ``fhir.json`` with the FHIR resources and
``resultset.json``, this document) and stores the document in the ``results`` row. Delivery
ships only the stored artifacts; the API and the dashboard read the nodules from here. The
document carries no patient attributes (those are only in the DICOM and FHIR artifacts).

The JSON form is versioned (:data:`SCHEMA`); :meth:`ResultSet.from_json` refuses other versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db import Job, Result

#: Version of the JSON document (bump on any incompatible change).
SCHEMA = "noduleai.resultset/1"
#: Manufacturer (0008,0070) of every object the encoders write.
MANUFACTURER = "NoduleAI"
#: SOP classes of the result objects (PS3.4 B.5).
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
#: Key Object Selection Document Storage: the IOCM rejection note of a rerun.
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
RESULT_SOP_CLASSES = frozenset(
    {
        SEGMENTATION_STORAGE,
        COMPREHENSIVE_3D_SR,
        GSPS_STORAGE,
        SECONDARY_CAPTURE,
        PARAMETRIC_MAP,
        KEY_OBJECT_SELECTION,
    }
)


def is_own_result(manufacturer: str | None, sop_class_uid: str) -> bool:
    """Whether a received instance is one of our result objects (a PACS sending them back)."""
    return manufacturer == MANUFACTURER and sop_class_uid in RESULT_SOP_CLASSES


class ObjectKind(StrEnum):
    """The result objects the encoders write."""

    SEG = "seg"
    SR = "sr"
    GSPS = "gsps"
    #: A Secondary Capture key image of one nodule.
    KEY_IMAGE = "key-image"
    #: The stage-1 screening heatmap, a Parametric Map (optional, ``NODULEAI_HEATMAP``).
    HEATMAP = "heatmap"
    #: The IHE IOCM rejection note listing the earlier results this one replaces.
    REJECTION = "rejection"


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced the findings: name and version, as the manifests give them."""

    name: str
    version: str

    @property
    def display(self) -> str:
        """``name version``, as result objects and FHIR resources show it."""
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ReportedNodule:
    """One nodule as every output reports it: the measurements and its identities.

    ``number`` is 1-based in report order; ``tracking_id`` ("Nodule 1") and ``tracking_uid`` are
    the SR's TID 1500 tracking identifier and UID, ``segment_number`` its SEG segment. The JSON
    field names are the public API's (``center_mm``, ...).
    """

    number: int
    tracking_id: str
    tracking_uid: str
    segment_number: int
    center_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    type: str
    probability: float
    needs_review: bool
    #: Lung-RADS mean diameter (mean of long and short axis, one decimal) and its solid part's.
    mean_diameter_mm: float = 0.0
    solid_mean_diameter_mm: float = 0.0
    #: Lung-RADS v2022 category, baseline rules (``pipelines.lungrads``); "" if not assessed.
    lung_rads: str = ""
    #: ``nodule``, ``mass`` or ``diffuse`` (``pipelines.lesions``); "nodule" in older documents.
    lesion_class: str = "nodule"
    #: ``left`` or ``right`` lung (from the centre's LPS x); "" in older documents.
    side: str = ""
    #: Centre in the cranial half of the lung mask (the Brock model's "upper lobe" proxy).
    upper_zone: bool | None = None
    #: Brock (PanCan) probability of cancer, 0..1 (``pipelines.brock``); ``None``: not assessed.
    malignancy_risk: float | None = None
    #: What the risk assumed, or why there is none.
    risk_note: str = ""
    #: Against the prior CT (:mod:`pipelines.comparison`): ``new``, ``stable``, ``grown`` or
    #: ``shrunk``; "" when the study was not compared.
    change: str = ""
    #: The matched prior nodule's volume, the volume change and the volume doubling time (days;
    #: only for a grown nodule); ``None`` when there is no matched prior nodule.
    prior_volume_mm3: float | None = None
    volume_change_percent: float | None = None
    doubling_time_days: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The nodule as ``findings.json`` and ``GET /api/studies/{uid}/findings`` show it."""
        return {
            "number": self.number,
            "tracking_id": self.tracking_id,
            "tracking_uid": self.tracking_uid,
            "segment_number": self.segment_number,
            "center_mm": [round(float(v), 2) for v in self.center_mm],
            "long_axis_mm": round(self.long_axis_mm, 2),
            "short_axis_mm": round(self.short_axis_mm, 2),
            "volume_mm3": round(self.volume_mm3, 1),
            "mean_hu": round(self.mean_hu, 1),
            "type": self.type,
            "probability": round(self.probability, 4),
            "needs_review": self.needs_review,
            "mean_diameter_mm": self.mean_diameter_mm,
            "solid_mean_diameter_mm": self.solid_mean_diameter_mm,
            "lung_rads": self.lung_rads,
            "lesion_class": self.lesion_class,
            "side": self.side,
            "upper_zone": self.upper_zone,
            "malignancy_risk": (
                None if self.malignancy_risk is None else round(self.malignancy_risk, 4)
            ),
            "risk_note": self.risk_note,
            "change": self.change,
            "prior_volume_mm3": _rounded(self.prior_volume_mm3, 1),
            "volume_change_percent": _rounded(self.volume_change_percent, 1),
            "doubling_time_days": _rounded(self.doubling_time_days, 0),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportedNodule:
        """Inverse of :meth:`to_json`."""
        x, y, z = (float(v) for v in data["center_mm"])
        return cls(
            number=int(data["number"]),
            tracking_id=str(data["tracking_id"]),
            tracking_uid=str(data["tracking_uid"]),
            segment_number=int(data["segment_number"]),
            center_mm=(x, y, z),
            long_axis_mm=float(data["long_axis_mm"]),
            short_axis_mm=float(data["short_axis_mm"]),
            volume_mm3=float(data["volume_mm3"]),
            mean_hu=float(data["mean_hu"]),
            type=str(data["type"]),
            probability=float(data["probability"]),
            needs_review=bool(data["needs_review"]),
            mean_diameter_mm=float(data.get("mean_diameter_mm", 0.0)),
            solid_mean_diameter_mm=float(data.get("solid_mean_diameter_mm", 0.0)),
            lung_rads=str(data.get("lung_rads", "")),
            lesion_class=str(data.get("lesion_class", "nodule")),
            side=str(data.get("side", "")),
            upper_zone=None if data.get("upper_zone") is None else bool(data["upper_zone"]),
            malignancy_risk=(
                None if data.get("malignancy_risk") is None else float(data["malignancy_risk"])
            ),
            risk_note=str(data.get("risk_note", "")),
            change=str(data.get("change", "")),
            prior_volume_mm3=_optional_float(data.get("prior_volume_mm3")),
            volume_change_percent=_optional_float(data.get("volume_change_percent")),
            doubling_time_days=_optional_float(data.get("doubling_time_days")),
        )


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class ResolvedNodule:
    """A prior nodule with no counterpart in the current study: centre in the *prior* study's
    patient coordinates, its volume and Lung-RADS mean diameter there."""

    center_mm: tuple[float, float, float]
    volume_mm3: float
    mean_diameter_mm: float

    def to_json(self) -> dict[str, Any]:
        """JSON form (the API's)."""
        return {
            "center_mm": [round(float(v), 2) for v in self.center_mm],
            "volume_mm3": round(self.volume_mm3, 1),
            "mean_diameter_mm": round(self.mean_diameter_mm, 1),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResolvedNodule:
        """Inverse of :meth:`to_json`."""
        x, y, z = (float(v) for v in data["center_mm"])
        return cls((x, y, z), float(data["volume_mm3"]), float(data["mean_diameter_mm"]))


class PriorOutcome(StrEnum):
    """Whether a study was compared with a prior CT."""

    COMPARED = "compared"
    BASELINE = "baseline"


@dataclass(frozen=True)
class PriorComparison:
    """The study against the patient's prior CT, or why it is reported as a baseline.

    Attributes
    ----------
    outcome : PriorOutcome
        ``compared``, or ``baseline`` (no prior used).
    reason, detail : str
        For a baseline: a code (``no_prior``, ``timeout``, ``query_refused``,
        ``association_rejected``, ``retrieve_refused``, ``retrieve_incomplete``,
        ``unreachable``, ``no_patient_id``, ``no_study_date``, ``prior_not_analysable``,
        ``registration_failed``, ``comparison_failed``) and a sentence without identifiers.
    study_instance_uid, study_date : str
        The prior study (ISO date).
    interval_days : float
        Days between the two StudyDates.
    findings_from : str
        Where the prior's nodules came from: ``result`` (this node's stored result),
        ``report`` (our SR in the prior study, read back) or ``detector`` (detected now).
    rotation_deg, translation_mm : float
        The rigid alignment of the prior to the current study.
    resolved : tuple of ResolvedNodule
        Prior nodules not found again.
    """

    outcome: PriorOutcome
    reason: str = ""
    detail: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    interval_days: float = 0.0
    findings_from: str = ""
    rotation_deg: float = 0.0
    translation_mm: float = 0.0
    resolved: tuple[ResolvedNodule, ...] = ()

    @classmethod
    def baseline(cls, reason: str, detail: str) -> PriorComparison:
        """A study reported without comparison, and why."""
        return cls(PriorOutcome.BASELINE, reason=reason, detail=detail)

    def to_json(self) -> dict[str, Any]:
        """JSON form (``resultset.json`` and the API)."""
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "detail": self.detail,
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date,
            "interval_days": round(self.interval_days, 1),
            "findings_from": self.findings_from,
            "rotation_deg": round(self.rotation_deg, 2),
            "translation_mm": round(self.translation_mm, 1),
            "resolved": [r.to_json() for r in self.resolved],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriorComparison:
        """Inverse of :meth:`to_json`."""
        return cls(
            outcome=PriorOutcome(data["outcome"]),
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            study_instance_uid=str(data.get("study_instance_uid", "")),
            study_date=str(data.get("study_date", "")),
            interval_days=float(data.get("interval_days", 0.0)),
            findings_from=str(data.get("findings_from", "")),
            rotation_deg=float(data.get("rotation_deg", 0.0)),
            translation_mm=float(data.get("translation_mm", 0.0)),
            resolved=tuple(ResolvedNodule.from_json(r) for r in data.get("resolved", ())),
        )


@dataclass(frozen=True)
class ResultObject:
    """One stored DICOM result object; ``path`` is relative to the spool root; ``finding`` the
    number of the finding a key image shows (``None`` for the other kinds)."""

    kind: ObjectKind
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    finding: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultObject:
        """Inverse of :func:`dataclasses.asdict`."""
        return cls(**{**data, "kind": ObjectKind(data["kind"])})


@dataclass(frozen=True)
class ResultSet:
    """Everything one job produced.

    Attributes
    ----------
    job_id, study_instance_uid, series_instance_uid : str
        The job, its study and the series the nodules were found in.
    model : ModelIdentity
        Part of every derived UID.
    nodules : tuple of ReportedNodule
        The nodules actually encoded, in SR order: exactly those in the SR, the SEG and FHIR.
    not_encoded : int
        Detected nodules left out because no stored frame shows them (no outline to draw).
    objects : tuple of ResultObject
        SEG, SR, GSPS as stored (SR only when there are no nodules), and the rejection note when
        this result replaces earlier ones of the study.
    fhir_path : str
        The stored FHIR resources (``{"report": ..., "observations": [...]}``), spool-relative.
    candidates : int
        Stage-1 candidates refined by stage 2.
    timings_ms : dict of str to float
        Per step, ``total`` included.
    backend : str
        The inference backends that ran.
    model_versions : dict of str to str
        Each stage's manifest version.
    lung_rads : str
        The study's Lung-RADS v2022 category (baseline rules); "" in documents written before
        it was assessed (fields added later are optional in version 1 of the document).
    instance_number : int
        InstanceNumber of the SEG, SR and GSPS: 1 for a study's first result, one more than
        the result it replaces otherwise.
    retracted : tuple of str
        SOP Instance UIDs of the earlier results this one replaces (listed by the rejection
        note; destinations retract them once this result's objects are confirmed).
    input_review : tuple of str
        Why the series lies outside what the detector was validated on
        (:func:`pipelines.inputcheck.input_review`; every nodule then needs review).
    prior : PriorComparison or None
        The comparison with the prior CT, or why there is none; ``None`` when the calling AE
        has no priors policy.
    """

    job_id: str
    study_instance_uid: str
    series_instance_uid: str
    model: ModelIdentity
    nodules: tuple[ReportedNodule, ...]
    not_encoded: int
    objects: tuple[ResultObject, ...]
    fhir_path: str
    candidates: int
    backend: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    #: The study's Lung-RADS v2022 category (its most suspicious nodule's; "1" without nodules).
    lung_rads: str = ""
    instance_number: int = 1
    retracted: tuple[str, ...] = ()
    prior: PriorComparison | None = None
    input_review: tuple[str, ...] = ()

    def object(self, kind: ObjectKind) -> ResultObject | None:
        """The stored object of ``kind``, if this result has one."""
        return next((o for o in self.objects if o.kind is kind), None)

    @property
    def sr_uid(self) -> str | None:
        """SOP Instance UID of the SR."""
        sr = self.object(ObjectKind.SR)
        return sr.sop_instance_uid if sr is not None else None

    @property
    def seg_uid(self) -> str | None:
        """SOP Instance UID of the SEG (none without nodules)."""
        seg = self.object(ObjectKind.SEG)
        return seg.sop_instance_uid if seg is not None else None

    def to_json(self) -> dict[str, Any]:
        """The versioned document (``resultset.json`` and the ``results.detail`` column)."""
        return {
            "schema": SCHEMA,
            "job_id": self.job_id,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "model": asdict(self.model),
            "nodules": [n.to_json() for n in self.nodules],
            "not_encoded": self.not_encoded,
            "objects": [{**asdict(o), "kind": o.kind.value} for o in self.objects],
            "fhir_path": self.fhir_path,
            "candidates": self.candidates,
            "backend": self.backend,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            "models": dict(self.model_versions),
            "lung_rads": self.lung_rads,
            "instance_number": self.instance_number,
            "retracted": list(self.retracted),
            "prior": None if self.prior is None else self.prior.to_json(),
            "input_review": list(self.input_review),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultSet:
        """Read a stored document.

        Raises
        ------
        ValueError
            When the document is not of :data:`SCHEMA`.
        """
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document: schema {data.get('schema')!r}")
        return cls(
            job_id=str(data["job_id"]),
            study_instance_uid=str(data["study_instance_uid"]),
            series_instance_uid=str(data["series_instance_uid"]),
            model=ModelIdentity(**data["model"]),
            nodules=tuple(ReportedNodule.from_json(n) for n in data["nodules"]),
            not_encoded=int(data["not_encoded"]),
            objects=tuple(ResultObject.from_json(o) for o in data["objects"]),
            fhir_path=str(data["fhir_path"]),
            candidates=int(data["candidates"]),
            backend=str(data["backend"]),
            timings_ms={str(k): float(v) for k, v in data["timings_ms"].items()},
            model_versions={str(k): str(v) for k, v in data["models"].items()},
            lung_rads=str(data.get("lung_rads", "")),
            instance_number=int(data.get("instance_number", 1)),
            retracted=tuple(str(u) for u in data.get("retracted", ())),
            prior=None if data.get("prior") is None else PriorComparison.from_json(data["prior"]),
            input_review=tuple(str(r) for r in data.get("input_review", ())),
        )


def stored_result(session: Session, job_id: str | None) -> ResultSet | None:
    """The result set stored for ``job_id`` (``None``: no job, no result yet).

    Raises
    ------
    ValueError
        When the stored document is not of :data:`SCHEMA`.
    """
    if job_id is None:
        return None
    row = session.scalar(select(Result).where(Result.job_id == job_id))
    return ResultSet.from_json(row.detail) if row is not None else None


def earlier_results(session: Session, job_id: str) -> list[ResultSet]:
    """The result sets other jobs of ``job_id``'s study stored, oldest first.

    A job stores its result only while it holds its lease unsuperseded, so every one of these
    comes from an earlier job: the last is the result the new one replaces.

    Raises
    ------
    ValueError
        When a stored document is not of :data:`SCHEMA`.
    """
    study_id = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
    rows = session.scalars(
        select(Result)
        .join(Job, Job.id == Result.job_id)
        .where(Job.study_id == study_id, Result.job_id != job_id)
        .order_by(Result.id)
    ).all()
    return [ResultSet.from_json(row.detail) for row in rows]


def nodules_json(nodules: Sequence[ReportedNodule]) -> list[dict[str, Any]]:
    """The nodules as the ``results.nodules`` column and the API list them."""
    return [n.to_json() for n in nodules]
